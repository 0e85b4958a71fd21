"""Keep the host's resident memory near the weights' own size while the FLUX models load.

    with frugal_loading():           # around diffsynth's from_pretrained / ModelPool loads
        pipe = FluxImagePipeline.from_pretrained(...)
    release_free_heap()              # after freeing many weights (the streamer's repacking)

Measured on the random FLUX.1-dev checkpoint (bench/bench_host_rss.py, CPU): loading the DiT in
float8 peaked 2.9 GiB above its 11.1 GiB of weights and left 1.6 GiB more than them resident;
repacking it for streaming added 2.3 GiB more. Two causes, both fixed here:

- diffsynth's ``DiskMap`` reads through safetensors' memory map and reopens the file (dropping
  the map) only every 10⁹ parameters, so up to 1.9 GiB of bf16 file pages stay mapped, and mapped
  pages count as resident. Its own ``DIFFSYNTH_DISK_MAP_BUFFER_SIZE`` shortens that window.
- glibc serves allocations under its mmap threshold from heap arenas, and that threshold rises to
  32 MiB as soon as a large block is freed, so most weight matrices (9-32 MiB in float8) land in
  the heap. Freed heap memory goes back to the system only from the top of a heap: the float8
  copies made and dropped while converting, and the weights the streamer repacks, stay resident.
  A fixed 1 MiB threshold while loading gives every weight its own mapping, returned when freed.

Both are process-wide settings; ``frugal_loading`` applies them only while it is open. Outside
glibc (musl, macOS) the allocator part is skipped.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

DISK_MAP_ENV = "DIFFSYNTH_DISK_MAP_BUFFER_SIZE"
# Parameters diffsynth's DiskMap reads before it reopens its files: 200 MB of bf16 file pages
# mapped at most (its default, 10⁹, is 2 GB). Reopening parses the header again: milliseconds.
DISK_WINDOW_PARAMS = 100_000_000
# While loading, every allocation from 1 MiB up gets its own mapping (a weight matrix is larger).
LOADING_MMAP_THRESHOLD = 1 << 20
# glibc's own ceiling for its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): where
# the threshold ends up after loading anyway. glibc cannot report or re-enable the dynamic one.
AFTER_MMAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations of ``nbytes`` and more with their own mapping (glibc ``mallopt``).
    False where the allocator has no such setting."""
    return _LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


def release_free_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the system (``malloc_trim(0)``).
    True when some memory was released."""
    return _LIBC is not None and _LIBC.malloc_trim(0) == 1


@contextmanager
def frugal_loading(window_params: int = DISK_WINDOW_PARAMS) -> Iterator[None]:
    """Load weights without the transient and leftover copies described above; on leaving,
    the allocator settings go back and the heaps' free pages are released."""
    previous = os.environ.get(DISK_MAP_ENV)
    os.environ[DISK_MAP_ENV] = str(int(window_params))  # read by each DiskMap it creates
    tuned = set_mmap_threshold(LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DISK_MAP_ENV, None)
        else:
            os.environ[DISK_MAP_ENV] = previous
        if tuned:
            set_mmap_threshold(AFTER_MMAP_THRESHOLD)
        release_free_heap()


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
