"""Files that survive a crash whole: fsync helpers and writes through a temporary file and a rename.

Example::

    write_atomically(Path("runs/kd/summary.json"), lambda f: f.write(b"[]\\n"))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to disk (a missing file raises: there is nothing durable to record)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` by ``write(binary_file)`` into a temporary file that is fsynced and renamed
    over it, so ``path`` is never half-written, even after a crash of the machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a name of its own: another process may write beside it
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
