"""Writing files so that a reader never sees half of one: write to a temporary name
beside the target, then rename over it (``os.replace`` is atomic on one file system)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; it becomes ``path`` when the block ends without error.
    The temporary name is the writer's own, so concurrent writers never mix their bytes. The
    file gets the permissions the user's umask gives a new file (safetensors writes 0600,
    which would lock the group out of a shared cache)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)  # reading it means setting it: set it straight back
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, content: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)


def write_json(path: str | Path, data) -> None:
    write_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


WRITABLE_DIR = "a directory this process can create and write in"  # what a path must be, as a config error says


def unwritable(path: str | Path) -> str | None:
    """Why this process cannot make ``path`` a directory and write in it, or None: a name in it
    longer than its file system allows (NAME_MAX), a file where a directory must be, or a
    directory this process may not write (read-only, or another user's). Nothing is created."""
    path = Path(os.path.abspath(path))
    limit = os.pathconf(path.anchor, "PC_PATH_MAX")
    if len(os.fsencode(path)) >= limit:
        return f"the path is {len(os.fsencode(path))} bytes long; this file system allows {limit - 1}"
    existing, exists = Path(path.anchor), True
    for name in path.parts[1:]:
        limit = os.pathconf(existing, "PC_NAME_MAX")
        if len(os.fsencode(name)) > limit:
            return f"its name {name[:24]}... is {len(os.fsencode(name))} bytes long; this file system allows {limit}"
        try:
            if exists and (existing / name).is_dir():
                existing = existing / name
            elif exists and (existing / name).exists():
                return f"{existing / name} is a file, not a directory"
            else:
                exists = False
        except PermissionError:
            return f"{existing} may not be entered by this process"
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return f"{existing} is read-only for this process"
    return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
