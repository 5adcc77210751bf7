"""Files: the one way elo writes outputs (atomically, fsynced, never over a user's files), content digests, and the
cache root.

Every directory elo writes as a whole (a model, a submodel, a train-state checkpoint) is built in a hidden temp
sibling, fsynced, stamped with a marker file and renamed into place. A destination that is a file, or a non-empty
directory without the marker, is refused: elo never deletes what it did not write.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MARKER = ".elo-output"  # present in every directory elo wrote as a whole; such a directory may be replaced
_TEMP_TAGS = (".tmp-", ".old-")  # `.NAME.tmp-XXXX` / `.NAME.old-XXXX`: siblings left only by a crash


def cache_root() -> Path:
    """elo's cache: `$ELO_CACHE`, else `~/.cache/elo` (the default model, token caches)."""
    return Path(os.environ.get("ELO_CACHE") or Path.home() / ".cache" / "elo")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def check_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, in one line, a destination elo must not write a directory to: a file, or a non-empty directory
    elo did not write. A missing or empty directory, or one holding an elo output, is fine."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"{what} {path} is a file, not a directory; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise ValueError(f"{what} {path} is a non-empty directory that elo did not write; "
                         f"choose a new or empty directory (elo never deletes files it did not write)")
    return path


def clean_stale_temps(path: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings of `path` left by an interrupted write."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*"):
            if any(tag in stale.name for tag in _TEMP_TAGS):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def atomic_dir(out: str | os.PathLike, fill: Callable[[Path], None], what: str = "output") -> Path:
    """Build directory `out` by calling `fill(tmp)` on a hidden temp sibling, then fsync it and rename it into place.

    A crash leaves the previous `out` (or none) and a temp sibling that the next write to `out` removes. An existing
    `out` is replaced only if elo wrote it (see `check_output_dir`)."""
    out = check_output_dir(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / MARKER).write_text("written by elo; this directory may be replaced by a later elo write\n")
        fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_file(p, "wb") as f: ...`: writes go to a temp file beside `path`, which is fsynced and renamed
    over `path` only if the block finishes; an exception leaves `path` as it was."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically: a crash leaves either the old file or the new one, never half of one."""
    with atomic_file(path) as f:
        f.write(text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
