"""The allocator tuning keeps activation-sized tensors in glibc's heap (no fresh mmap per tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from opsd_core.backends.runtime import tune_allocator

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert tune_allocator() and tune_allocator()  # idempotent
before = libc.mallinfo2().hblks
x = torch.empty(4 * 2**20)  # 16 MiB: above glibc's initial mmap threshold, below the tuned one
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_allocator_serves_large_tensors_from_the_heap() -> None:
    def mmapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    assert mmapped("default") == 1  # what glibc does on its own: a fresh mapping for the tensor
    assert mmapped("tuned") == 0
