"""Writing files so that a reader never sees half of one: every output goes through here.

- `atomic_write`: a whole file, written beside its target and renamed over it.
- `create_new`: the same, but never replacing a file that exists (two creators: one wins).
- `write_together`: several whole files, all replaced or none.
- `atomic_folder`: a whole folder, written beside its target and swapped in for it.
- `append_line`: one whole line at the end of a log-like file, or nothing.
- `FolderLock`: one process at a time writes into an output folder (flock(2) on `.meestral.lock`).

A writer killed by SIGKILL leaves its temp file `.NAME.tmpPID` behind; the next write to the same
path (and `remove_stale_temps` on a whole folder) removes temp files whose process is gone.
Errors are raised as OSError naming the target (not the temp file); `describe_os_error` turns one
into the one line the CLI prints.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)(-old)?$")


def temp_name(path: Path, suffix: str = "") -> Path:
    """This process's temp path beside `path` (`.NAME.tmpPID`, + suffix)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder, name: str | None = None) -> None:
    """Remove temp files and folders (of `name`, or of every name) in `folder` whose writer died."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _named(e: OSError, path: Path) -> OSError:
    """The same error (same subclass, same errno) naming the target instead of a temp file."""
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else e


def _write_temp(path: Path, write) -> Path:
    remove_stale_temps(path.parent, path.name)
    tmp = temp_name(path)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return tmp


def atomic_write(path, write) -> Path:
    """`write(tmp)` into a temporary file in `path`'s folder, flushed to disk, then renamed over
    `path`: a kill or a failure leaves the previous file (or none), never a partial one."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        os.replace(_write_temp(path, write), path)
    except OSError as e:
        raise _named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_new(path, write) -> bool:
    """Like `atomic_write`, but an existing `path` is kept (link(2) refuses to replace it): with
    several creators at once exactly one file wins. True if this call created it."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        os.link(_write_temp(path, write), path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise _named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_together(writes: dict) -> list[Path]:
    """Each `{path: write}` as by `atomic_write`, all of them or none: a failure part way puts the
    files already replaced back as they were (their previous contents, or no file), then raises.
    For files that only make sense together (a page and its figures, a table and its plot)."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            old = None
            if path.exists():  # keep the previous file under a temp name until all are written
                old = temp_name(path, "-old")
                old.unlink(missing_ok=True)
                os.link(path, old)
            done.append((path, old))
            atomic_write(path, write)
    except BaseException:
        for path, old in reversed(done):
            if old is not None:
                if path.exists() and os.path.samefile(old, path):
                    old.unlink()  # not replaced yet (rename(2) between two links of one file does nothing)
                else:
                    os.replace(old, path)
            else:
                path.unlink(missing_ok=True)
        raise
    for _, old in done:
        if old is not None:
            old.unlink(missing_ok=True)
    return [p for p, _ in done]


def atomic_folder(path, write) -> Path:
    """`write(tmp)` into a temporary folder beside `path`, its files flushed to disk, then published
    as `path`: a kill or a failure leaves the previous folder (or none), never a partial one; an
    existing `path` is replaced only once the new folder is complete. The temp folder
    `.NAME.tmpPID` a SIGKILL leaves is removed by the next write (`remove_stale_temps`)."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    tmp, old = temp_name(path), temp_name(path, "-old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _swap_in(tmp, path, old)
    except OSError as e:
        raise _named(e, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, after an exchange
        shutil.rmtree(old, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path, old: Path) -> None:
    """Put folder `tmp` at `path`. rename(2) replaces only an empty folder: a full one is exchanged
    with `tmp` in one renameat2(RENAME_EXCHANGE) where the kernel and file system have it (Linux
    3.15+), so `path` is at every moment the old folder or the new one; elsewhere it is moved aside
    first (a kill between the two renames leaves no `path`, the old folder under `old`)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        return
    os.replace(path, old)
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def append_line(path, line: str) -> None:
    """Append `line` and a newline in one write, flushed to disk. On failure (a full disk) the file
    is cut back to its previous end, so it never ends in half a line this call wrote; a SIGKILL
    mid-write can still leave one, which readers drop (see evaluation.sweep.ResultsTable, training.run_log.RunLog)."""
    path = Path(path)
    data = memoryview((line.rstrip("\n") + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, end)
            if end == 0:  # a file this call created (or an empty one): no 0-byte file is left behind
                path.unlink(missing_ok=True)
            raise _named(e, path) from None
    finally:
        os.close(fd)


LOCK = ".meestral.lock"


class FolderLock:
    """An exclusive lock on an output folder for as long as this object is open: flock(2) on
    `folder/.meestral.lock`, which holds the holder's pid and what it runs. The kernel drops the
    lock when its process ends (even by SIGKILL), so a lock file left by a dead process is taken
    over; `release` removes the file, and then the folders listed in `created` (deepest first) that
    are left empty: a run refused or failed before writing anything leaves no empty folder behind.
    `FolderLock.holder(folder)` names a live holder, or None."""

    def __init__(self, folder, what: str, created: list | tuple = ()):
        import fcntl

        self.path = Path(folder) / LOCK
        self.created = [Path(p) for p in created]
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                from meestral.errors import MeestralError

                raise MeestralError(f"{self.path.parent} is in use by another run "
                                    f"({FolderLock.holder(self.path.parent) or 'pid unknown'}): let it finish, "
                                    "or choose another output folder") from None
            try:  # the file a releasing holder unlinked is no lock: take the one at the path now
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.truncate(0)
        f.write(f"{os.getpid()} {what}\n")
        f.flush()
        self._file = f

    @staticmethod
    def holder(folder) -> str | None:
        """'pid N, <what>' of the process holding `folder`'s lock, or None when none does."""
        import fcntl

        try:
            f = open(Path(folder) / LOCK)
        except OSError:
            return None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it (a dead holder's file)
            except BlockingIOError:
                pid, _, what = f.read().strip().partition(" ")
                return f"pid {pid}, {what}" if pid else "pid unknown"

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one can take a file about to vanish
            self._file.close()
            self._file = None
            for folder in self.created:
                try:
                    folder.rmdir()  # only when empty (another run's lock file or any output keeps it)
                except OSError:
                    break


def write_json(path, obj, **dumps) -> Path:
    return atomic_write(path, lambda t: t.write_text(json.dumps(obj, **dumps)))


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: what failed, on which path, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk is full: free some space, or write to another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    elif e.errno == errno.ENOENT:
        fix = "check the path"
    else:
        fix = "check the path and the disk"
    return f"{e.strerror or type(e).__name__}:{where}: {fix}"
