"""Atomic file and folder writes (a crash leaves the old one or the new one, never half of one), checksums.

Temporary names end in ``-HOST-PID-RANDOM`` (``HOST`` a hash of the host name): a later writer removes those of
writers that died on this host (a ``kill -9`` skips every ``finally``) and never touches those of live ones.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sbmoe.errors import IndexBusyError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two writers of one folder are then not serialised
    fcntl = None

SCRATCH = re.compile(r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)
AT_FDCWD = -100


def scratch_name(label: str) -> str:
    """``LABEL-HOST-PID-RANDOM``: a temporary name that says which process on which host owns it."""
    return f"{label}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(parent: Path, label: str) -> None:
    """Remove the entries of ``parent`` named ``scratch_name(label...)`` by processes of this host that are gone."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(label) or not _dead_writer(name):
            continue
        path = parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with suppress(OSError):  # a read-only folder: left for a writer that may
                path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is renamed over ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    label = f".{final.name}.tmp"
    remove_stale(final.parent, label)
    tmp = final.with_name(scratch_name(label))
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error it replaces ``path`` whole.

    A crash at any point leaves ``path`` as it was or as the block wrote it; the next call removes the temporary
    folders that a killed writer left behind.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = final.parent / scratch_name(f".{final.name}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Put back ``final`` from an old copy a killed :func:`replace_dir` fallback left; remove dead writers' temps."""
    if not final.exists():
        olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
        dead = [p for p in olds if _dead_writer(p.name)]
        if dead:
            os.rename(dead[-1], final)
    remove_stale(final.parent, f".{final.name}.tmp")
    remove_stale(final.parent, f".{final.name}.old")


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished folder ``new`` to ``final`` in one atomic step; an existing ``final`` is deleted after.

    An existing ``final`` is swapped with ``new`` (``renameat2(RENAME_EXCHANGE)``), so ``final`` is at every moment
    the old folder or the new one. Where the swap is not supported, ``final`` is moved aside first: a kill between
    the two renames leaves no ``final`` but an ``.old-*`` copy, which :func:`atomic_dir` puts back.
    """
    try:
        os.rename(new, final)  # atomic when final is absent (or an empty folder)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # it holds the old folder now
        return
    old = final.parent / scratch_name(f".{final.name}.old")
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


@contextmanager
def writer_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` (made empty if absent) exclusively while a writer reads, changes and replaces it.

    The lock is the kernel's ``flock`` on the folder itself, no lock file: it goes with the process, however it
    ends. A writer that replaces the folder (:func:`atomic_dir`) does so as its last step, so a second writer
    that arrives before then is refused, and one that arrives after sees the new folder.

    Raises:
        IndexBusyError: another process holds it (its writes would be lost under this one's, or the reverse).
    """
    final = Path(folder)
    if fcntl is None:
        yield
        return
    made = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    fd = os.open(final, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise IndexBusyError(f"{final}: another process is writing it; run this again once it ends") from err
        if os.fstat(fd).st_ino != final.stat().st_ino:  # replaced between open and lock: the writer just ended
            raise IndexBusyError(f"{final}: another process just replaced it; run this again")
        yield
    finally:
        os.close(fd)
        if made:  # a writer that failed before saving leaves no empty folder behind
            with suppress(OSError):
                final.rmdir()


def last_complete_checkpoint(folder: str | os.PathLike, marker: str = "trainer_state.json") -> Path | None:
    """The highest-numbered ``checkpoint-N`` folder whose ``marker`` (the file the trainer writes last) reads back.

    A ``kill -9`` while the trainer writes a checkpoint leaves a folder without (or with half of) the marker;
    resuming from it would fail, so it is skipped.
    """
    numbered = []
    for path in Path(folder).glob("checkpoint-*"):
        if path.name.removeprefix("checkpoint-").isdigit() and path.is_dir():
            numbered.append((int(path.name.removeprefix("checkpoint-")), path))
    for _, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return path
    return None


def sha256_file(file: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks: the one file checksum (index and retriever manifests,
    embedding cache entries, the ONNX encoder's digest)."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2``, or None off Linux or with an older C library."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


@functools.cache
def _host() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _dead_writer(name: str) -> bool:
    """Whether ``name`` is a :func:`scratch_name` of a process of this host that no longer runs."""
    match = SCRATCH.search(name)
    return match is not None and match["host"] == _host() and not _alive(int(match["pid"]))


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
