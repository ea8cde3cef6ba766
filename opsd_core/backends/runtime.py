"""Process-level settings for training: the C allocator, torch's threads, peak memory.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (128 KiB
at start, adapting up to 32 MiB) with fresh ``mmap`` pages and returns freed heap memory to the OS
past its trim threshold, so a training step that allocates and frees the same activation-sized
buffers again and again page-faults on every one of them (the kernel zero-fills each page; in a
virtual machine a fault costs several times more). Keeping those blocks in the heap removed ~20 % of
the student's forward + backward on SmolLM2 on the 2-core VM (``benchmarks/README.md``), the same
effect the usual advice to preload jemalloc or tcmalloc gets, without a native dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit: blocks below it come from the reusable heap
TRIM_THRESHOLD = 2**30  # keep up to 1 GiB of freed heap instead of returning it page by page
_done = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def configure_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads; on small machines oversubscription costs far more than it gains."""
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
