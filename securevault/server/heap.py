# -*- test-case-name: tests.server.test_heap -*-
"""Giving the memory that threads freed back to the system.

glibc keeps what a thread frees in that thread's arena for reuse, and large
transfers leave the pool threads' arenas full of free but resident pages:
the idle daemon measured 80-106 MiB after hundreds of 16 MiB uploads (61 MiB
at start), 68-93 MiB once C{malloc_trim(0)} had run (bench/README.md).  The
periodic sweep calls L{trim_heap} in the pool, so an idle daemon shrinks
within a minute; transfers themselves are not slowed (pages handed back
cost a fault each when used again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = None
_name = ctypes.util.find_library("c")
if _name:
    try:
        _function = ctypes.CDLL(_name).malloc_trim  # glibc only
        _function.argtypes = [ctypes.c_size_t]
        _function.restype = ctypes.c_int
        _malloc_trim = _function
    except (OSError, AttributeError):
        _malloc_trim = None


def trim_heap() -> bool:
    """Hand free heap pages back to the system (glibc's C{malloc_trim(0)});
    whether this C library can."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
