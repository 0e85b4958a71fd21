"""Files that survive a power cut: written beside, flushed to disk, then renamed into place.

The journal says a job is finished only after its PNG is on disk (``write_durably`` returns),
so after a power cut a finished job's file is whole, and a half-written one never has the
final name.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_directory(path.parent)


def _sync_directory(folder: Path) -> None:
    """The rename itself is only durable once the folder's entry is on disk (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on a folder
        pass
    finally:
        os.close(fd)
