"""One base for every error a user can cause or fix.

The CLI prints an :class:`OpsdError` as one line (what is wrong, where, and what to do) and exits with
its ``exit_code``; any other exception is a bug in opsd and keeps its traceback.
"""

from __future__ import annotations


class OpsdError(Exception):
    """A user-facing error; the message names the file, line or setting and what to do."""

    exit_code = 1


class SettingError(OpsdError, ValueError):
    """A setting that cannot work (a bad value, or one this machine cannot honour): nothing ran."""

    exit_code = 2
