"""Returning freed heap memory to the system (glibc).

glibc keeps freed memory in its heap for reuse, so a process's RSS stays at its high-water mark
after a large transient is freed, and blocks freed between live ones fragment it. malloc_trim
releases the free pages, including those inside the heap (glibc >= 2.8 madvises them away)."""

from __future__ import annotations

import ctypes


def release_freed_heap() -> None:
    """malloc_trim(0); a no-op where it does not exist (not glibc). Costs milliseconds."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
