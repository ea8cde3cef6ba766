"""Loopback helpers shared by the local servers (``opsd server``), the test servers and the view screenshots."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

__all__ = ["answers", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller binds it soon: a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers a GET with a 2xx status within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the callers' own servers)
            return 200 <= response.status < 300
    except (OSError, urllib.error.HTTPError):
        return False
