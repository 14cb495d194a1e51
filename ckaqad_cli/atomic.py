"""Atomic file and directory writes: write under a temporary name next to the target, fsync, then rename.

A reader (or a later stage) therefore sees either the old content or the complete new content, never a prefix.
Files and directories get the permissions a plain ``open`` / ``mkdir`` would give under the process's umask (the
temporary names are created private, 0600 and 0700): a packed model must be readable by the inference server's user.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


OUTPUT_MARKER = ".ckaqad-output"
"""An empty file that ckaqad leaves in every output directory it writes: ``--force`` replaces only a directory that
holds it (or an empty one), never a folder of the user's. Hidden files are not uploaded by push."""


def _umask() -> int:
    """The process's umask (read from /proc where it can be, since setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-directory temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it is renamed to ``target``.

    On any exception the temporary directory is removed and ``target`` is untouched. With ``overwrite`` an existing
    ``target`` is replaced (it is moved aside first, then deleted once the new one is in place); a caller replacing
    a path the user named checks it first (pack's ``check_replaceable``). The new directory carries
    :data:`OUTPUT_MARKER`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(str(target))
    remove_stale_leftovers(target)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / OUTPUT_MARKER).touch()
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.{owner}.old"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_leftovers(target: Path) -> list[Path]:
    """Delete what a killed :func:`atomic_directory` left beside ``target`` (its temporary directory, or the old
    target moved aside), when the process that made it is gone from this host; a process on another host sharing
    the file system, or still alive, keeps its own. Returns the paths removed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<host>.+)-(?P<pid>\d+)\.(?:\w+\.partial|old)")
    removed = []
    for path in target.parent.glob(f".{target.name}.*"):
        m = pattern.fullmatch(path.name)
        if m and m["host"] == socket.gethostname() and not pid_alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
