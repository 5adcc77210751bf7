"""Files: the one way elo writes outputs (atomically, fsynced, never over a user's files), who owns an output
directory, content digests, and the cache root.

Every directory elo writes as a whole (a model, a submodel) is built in a hidden temp sibling, fsynced, stamped with
a marker file listing what elo wrote, and renamed into place. A destination that is a file, or a non-empty directory
without the marker, is refused; replacing a marked directory carries over every file elo did not write. Temporaries
are named `.NAME.tmp-PID-HOST-RANDOM`: only that process, or a later one once PID is provably gone from HOST,
removes them, and nothing but such exact names is ever removed. `lock_output` makes one live process the owner of
an output directory (an advisory lock, released when the process exits, however it exits).
"""
from __future__ import annotations

import atexit
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MARKER = ".elo-output"  # present in every directory elo wrote as a whole (JSON: the files it wrote there)
LOCK = ".elo-lock"  # in an output directory while a process owns it: "PID HOST"
HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-(?P<host>[\w.]+)-[a-z0-9_]{8}$")


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


def _temp_path(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}"


def is_temp(name: str) -> bool:
    """Whether a file name is one of elo's temporaries."""
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(path: Path) -> None:
    """Remove the temporaries of `path` (`.NAME.tmp-PID-HOST-XXXXXXXX`, `.NAME.old-...`) whose writer is provably
    gone: a process of this host that no longer exists. A live writer's, another host's, and anything not named
    exactly so are left alone."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.*"):
        m = _TEMP.match(stale.name)
        if m and m["name"] == path.name and m["host"] == HOST and not _alive(int(m["pid"])):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _written_by_elo(directory: Path) -> set[str] | None:
    """The files (relative paths) elo wrote into a marked directory; None for a marker that predates the list."""
    try:
        return set(json.loads((directory / MARKER).read_text())["files"])
    except (ValueError, KeyError, TypeError):
        return None


def _carry_over(old: Path, new: Path) -> None:
    """Move the files a user added to `old` (an elo output about to be replaced) into `new`, or refuse in one line
    before anything moves when `new` has a file of the same name."""
    ours = _written_by_elo(old)
    if ours is None:
        return
    theirs = [p for p in old.rglob("*") if p.is_file() and p.name != MARKER
              and p.relative_to(old).as_posix() not in ours]
    # a file the new output also has, byte for byte (a side file copied along in place), loses nothing
    theirs = [p for p in theirs if not ((new / p.relative_to(old)).is_file()
                                        and filecmp.cmp(p, new / p.relative_to(old), shallow=False))]
    clash = [p for p in theirs if (new / p.relative_to(old)).exists()]
    if clash:
        raise ValueError(f"{clash[0]} was not written by elo and the new output has a file of that name; move it "
                         f"away first (elo never deletes files it did not write)")
    for p in theirs:
        (new / p.relative_to(old)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, new / p.relative_to(old))


def atomic_dir(out: str | os.PathLike, fill: Callable[[Path], None], what: str = "output") -> Path:
    """Build directory `out` by calling `fill(tmp)` on a hidden temp sibling, then fsync it and rename it into place.

    A crash leaves the previous `out` (or none) and a temp sibling that a later write removes once this process is
    gone. An existing `out` is replaced only if elo wrote it (see `check_output_dir`), and files a user added to it
    are carried over into the new one."""
    out = check_output_dir(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = _temp_path(out, "tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"written_by": "elo; this directory may be replaced by a later elo "
                                                            "write, which keeps files elo did not write",
                                              "files": files}, indent=1) + "\n")
        if out.exists():
            _carry_over(out, tmp)
        fsync_tree(tmp)
        if out.exists():
            old = _temp_path(out, "old")
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


def _flock(path: Path, blocking: bool) -> int | None:
    """An open descriptor of `path` holding its exclusive flock (None: another process holds it and `blocking` is
    off). The file may be unlinked by the holder on release: a lock taken on a file no longer at `path` is dropped
    and taken again on the one there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Remove the lock file, then let go of it (a waiter then finds no file, or a new one, see `_flock`)."""
    path.unlink(missing_ok=True)
    os.close(fd)


@contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Wait until no other process is inside a block for the same `path` (a shared cache entry being built), then
    run the block: the second process finds the first one's result instead of building it again. The lock file,
    `.NAME.lock` beside `path`, is gone afterwards (a killed process's is reused: flocks die with their process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = _flock(lock, blocking=True)
    try:
        yield
    finally:
        _release(lock, fd)


_OWNED: dict[Path, tuple[int, bool]] = {}  # directories this process owns -> (its lock's descriptor, created it)


def lock_output(directory: str | os.PathLike, what: str = "--out") -> None:
    """Own `directory` (created if missing) for the rest of this process: a second writer, in this process or
    another, gets a one-line error naming the owner. The lock is an flock on `directory/.elo-lock`, released by the
    kernel when the owner exits, however it exits; a lock file left by a process that is gone is taken over."""
    directory = Path(directory).resolve()
    if directory in _OWNED:
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = _flock(directory / LOCK, blocking=False)
    if fd is None:
        try:
            holder = (directory / LOCK).read_text().strip() or "another process"
        except FileNotFoundError:
            holder = "another process"
        raise ValueError(f"{what} {directory} is in use by process {holder} (lock {directory / LOCK}); wait for it "
                         f"to finish or choose another {what}")
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
        print(f"elo: taking over {directory / LOCK} from process {previous}, which is gone", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {HOST}\n".encode(), 0)
    _OWNED[directory] = (fd, created)


def check_not_owned(directory: str | os.PathLike, what: str = "--out") -> None:
    """Read-only: a one-line error naming the live owner of `directory` if it has one (nothing is created)."""
    lock = Path(directory) / LOCK
    if Path(directory).resolve() in _OWNED or not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        raise ValueError(f"{what} {Path(directory).resolve()} is in use by process {holder} (lock {lock}); wait for "
                         f"it to finish or choose another {what}") from None
    finally:
        os.close(fd)


def unlock_output(directory: str | os.PathLike) -> None:
    """Give up ownership taken by `lock_output`: the lock file goes, and so does the directory when this process
    created it and left nothing else in it (a run refused after its checks, say)."""
    directory = Path(directory).resolve()
    fd, created = _OWNED.pop(directory, (None, False))
    if fd is None:
        return
    _release(directory / LOCK, fd)
    if created and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


@atexit.register
def _unlock_all() -> None:
    for directory in list(_OWNED):
        unlock_output(directory)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_file(p, "wb") as f: ...`: writes go to a temp file beside `path`, which is fsynced and renamed
    over `path` only if the block finishes; an exception leaves `path` as it was."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-{HOST}-")
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
