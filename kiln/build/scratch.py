"""The scratch dir a build writes into before it renames it to the engine dir, and what an
interrupted build leaves behind.

A build holds an exclusive lock (flock) on its scratch dir until it is renamed or removed,
so another process can tell a build in progress from the leftover of one that was killed
(kill -9, the OOM killer): the kernel drops the lock with the process. SIGTERM unwinds a
build like Ctrl-C does, so its scratch dir goes too.

mkdtemp makes a private dir (0700) and safetensors private files (0600); a built engine
follows the umask instead (0755 / 0644 under umask 022), as `cp -r` or `mkdir` would
make it: the scratch dir is made so, and `release` gives the files of the engine dir it
became their modes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from kiln.build.engine_dir import ENGINE_JSON
from kiln.errors import BuildError

PREFIX = ".kiln-build-"


def make_scratch(output_dir: Path) -> tuple[Path, int | None]:
    """An empty, locked dir beside output_dir and its lock (release with `release`), or a
    BuildError saying why output_dir cannot be written."""
    for parent in output_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BuildError(f"cannot write {output_dir}: {parent} is a file, not a "
                                 "directory")
            break
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=output_dir.parent))
            os.chmod(path, 0o777 & ~_umask())
            lock = _lock(path)
            if lock is not False:
                return path, lock
            # `kiln cache clear` took it between mkdtemp and the lock, and removes it
        raise OSError("another process removed every scratch dir this build made")
    except OSError as e:
        raise BuildError(f"cannot write {output_dir}: {e.strerror or e} in "
                         f"{output_dir.parent}") from None


def release(lock: int | None) -> None:
    """Drop the scratch dir's lock; the engine dir it was renamed to (the lock's fd follows
    it) gets the modes the umask gives new files and dirs first (see the module)."""
    if lock is not None:
        try:
            if os.fstat(lock).st_nlink:  # renamed into place, not removed
                follow_umask(lock)
        finally:
            os.close(lock)


def follow_umask(folder: Path | int) -> None:
    """The files and dirs under folder (a path, or an open dir's fd; symlinks left alone)
    get the modes that the umask gives new ones: 0644 and 0755 under umask 022."""
    mask = _umask()
    walk = os.fwalk(".", dir_fd=folder) if isinstance(folder, int) else os.fwalk(folder)
    for _, dirs, files, fd in walk:
        for name in dirs + files:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                os.chmod(name, (0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask, dir_fd=fd)


def _umask() -> int:
    try:  # Linux 4.7+: read without setting it (other threads may be creating files)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o22)  # elsewhere it is read by setting it
        os.umask(mask)
        return mask


def _lock(path: Path) -> int | None | bool:
    """An fd holding path's exclusive lock; False when another process holds it or path
    is gone; None where locks are not available (then nothing is ever a leftover)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return False if isinstance(e, BlockingIOError) else None  # else: no locks here
    if os.fstat(fd).st_nlink == 0:  # removed by whoever held it before us
        os.close(fd)
        return False
    return fd


def leftovers(folder: Path) -> list[Path]:
    """Scratch dirs in folder that no build holds: what killed builds left behind."""
    found = []
    for path in sorted(folder.glob(PREFIX + "*")) if folder.is_dir() else ():
        lock = _lock(path) if path.is_dir() else False
        if lock is not False and lock is not None:
            os.close(lock)
            found.append(path)
    return found


def remove_leftover(path: Path) -> bool:
    """Remove a scratch dir unless a build took it meanwhile; whether it was removed."""
    lock = _lock(path)
    if lock is False or lock is None:
        return False
    try:
        shutil.rmtree(path)
    finally:
        os.close(lock)
    return True


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise SystemExit(128 + signal) inside the block, as Ctrl-C
    raises KeyboardInterrupt, so the build's cleanup runs; a second one while it cleans
    up is ignored. Only where the signal's default action (death) stands, in the main
    thread: a handler someone else installed is left alone."""
    signals = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        signals = []
    previous = {}
    for number in signals:
        if signal.getsignal(number) is signal.SIG_DFL:
            previous[number] = signal.signal(number, _unwind)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _unwind(number: int, frame) -> None:
    for other in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if other is not None and signal.getsignal(other) is _unwind:
            signal.signal(other, signal.SIG_IGN)
    raise SystemExit(128 + number)


# Where the engine goes: renamed over output_dir, or moved into a dir that cannot be
# replaced (a mount point: a Docker volume), engine.json last.
def in_place(output_dir: Path) -> bool:
    """Whether the engine goes into output_dir: a mount point cannot be renamed over, and
    a symlink's target is where it should go."""
    return output_dir.is_dir() and (os.path.ismount(output_dir) or output_dir.is_symlink())


def replace(output_dir: Path, scratch: Path) -> bool:
    """Rename scratch to output_dir, an old engine there renamed aside first and removed
    last (under a scratch name: stopped before it is gone, it is a killed build's
    leftover, and output_dir a whole engine, never a half-removed one); False where
    output_dir turns out to be a mount point (EBUSY: a bind mount of the same filesystem,
    which os.path.ismount does not see), left as it was."""
    aside = None
    try:
        if output_dir.exists():
            aside = Path(tempfile.mkdtemp(prefix=PREFIX, dir=output_dir.parent))
            try:
                output_dir.rename(aside)  # onto the empty dir: a name no one else takes
            except OSError:
                aside.rmdir()
                raise
        try:
            scratch.rename(output_dir)
        except OSError:
            if aside is not None:
                aside.rename(output_dir)
            raise
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)  # (a build beside may clear it first)
    return True


def move_into(scratch: Path, output_dir: Path) -> None:
    """The engine written in scratch moved into output_dir in place of what is there (an
    old engine: its engine.json first, so a build stopped halfway leaves no engine; other
    builds' scratch dirs and a filesystem's lost+found stay), the new engine.json last."""
    old = [p for p in output_dir.iterdir() if p != scratch and not kept(p)]
    for path in sorted(old, key=lambda p: p.name != ENGINE_JSON):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted(scratch.iterdir(), key=lambda p: p.name == ENGINE_JSON):
        shutil.move(path, output_dir / path.name)  # a rename; a copy across filesystems


def kept(path: Path) -> bool:
    """What an engine dir may hold besides the engine (see move_into)."""
    return path.name.startswith(PREFIX) or (
        path.name == "lost+found" and os.path.ismount(path.parent))
