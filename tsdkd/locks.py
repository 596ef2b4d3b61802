"""A command's output folder: made and checked to take files, locked while the command writes into it, and its
files given the permissions the umask asks for."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tsdkd.errors import TsdkdError

# The lock handles this process holds. A forked child (a data loader worker, an engine process) gets copies,
# which would keep a lock alive after this process ends: the child closes them at once.
_held: set[int] = set()


def _close_in_child() -> None:
    for handle in _held:
        os.close(handle)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def writable_folder(out: Path) -> Path:
    """--out, created if need be, once it is known to take files (before hours go into loading or sampling)."""
    if out.exists() and not out.is_dir():
        raise TsdkdError(f"--out {out} is a file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise TsdkdError(f"--out {out}: cannot write there ({error.strerror}); choose a writable folder") from None
    return out


def default_permissions(path: Path) -> None:
    """The mode open() or mkdir() would have given `path` under the umask (0644, 0755 by default): safetensors
    and mkdtemp make files and folders their owner's alone, while a student or results are shared."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def current_umask() -> int:
    """This process's umask, read from /proc (setting it to read it, the only other way, races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # no /proc: read it by setting it, briefly
    os.umask(umask)
    return umask


FULL_DEVICE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space_left(folder: Path) -> bool:
    """Whether `folder`'s device (or the user's quota on it) takes no 1 MiB more, found by writing it: some writers
    report a full device without its errno (torch's checkpoint writer: `basic_ios::clear: iostream error`)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(2**20))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        return error.errno in FULL_DEVICE_ERRNOS
    return False


# How writers that give no errno say a write failed: torch's checkpoint writer (`torch.save`).
_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter", "inline_container", "file write failed")


def _full_device(error: Exception, folder: Path) -> str | None:
    """Which full device `error` reports (--out's, or that of the file it names), None when it reports none."""
    if isinstance(error, OSError):
        if error.errno not in FULL_DEVICE_ERRNOS:
            return None
        name = os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes)) else None  # not an fd
        if name and not Path(os.path.abspath(name)).is_relative_to(os.path.abspath(folder)):
            return f"the device of {name}"
        return f"--out {folder}: its device"
    # safetensors (the weights) reports the OS error's number in its message only.
    if type(error).__name__ == "SafetensorError" and any(f"(os error {n})" in str(error) for n in FULL_DEVICE_ERRNOS):
        return f"--out {folder}: its device"
    if isinstance(error, RuntimeError) and any(mark in str(error) for mark in _WRITE_FAILURES) and no_space_left(folder):
        return f"--out {folder}: its device"
    return None


@contextlib.contextmanager
def full_device_is_one_line(folder: Path) -> Iterator[None]:
    """A write that failed because its device is full ends in one line: known by the errno, or, for a writer that only
    says that writing failed, by `folder`'s device taking nothing more. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        where = _full_device(error, folder)
        if where is None:
            raise
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "write failed"
        raise TsdkdError(f"no space left on {where} ({type(error).__name__}: {detail}); free some space, then rerun the "
                         "same command to continue") from None


@contextlib.contextmanager
def exclusive_use(folder: Path, command: str) -> Iterator[None]:
    """Held while `tsdkd <command>` writes into `folder`. A rerun continues what is there, so a second command
    into the same folder (a job submitted twice, a requeue while the first still runs) is refused instead of
    writing beside the first. The kernel drops the lock when the process ends, however it ends. On a shared
    filesystem it may hold within one machine only, and where the filesystem has no locks, not at all."""
    handle = os.open(folder, os.O_RDONLY)
    _held.add(handle)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(folder)
            raise TsdkdError(f"--out {folder} is in use by another running tsdkd command ({holder or 'not found'}; this one: "
                             f"`tsdkd {command}`); wait for it to end, or choose another --out") from None
        except OSError as error:  # a filesystem without locks
            print(f"note: cannot lock --out {folder} ({error.strerror}); do not run two commands into it at once")
        yield
    finally:
        _held.discard(handle)
        os.close(handle)


def in_use(folder: Path) -> bool:
    """Whether another command holds `folder` (exclusive_use): tried, not looked up, so any holder counts."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: exclusive_use says so
        return False
    finally:
        os.close(handle)


def lock_holder(folder: Path) -> str | None:
    """"pid N: its command line" of the process holding an flock on `folder`, read from Linux's /proc/locks
    (the lock's own machine only); None where that cannot be read."""
    try:
        status = os.stat(folder)
        wanted = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
        with open("/proc/locks") as locks:
            # "1: FLOCK  ADVISORY  WRITE 2520 fe:00:2162958 0 EOF"
            pids = [fields[4] for fields in map(str.split, locks) if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted]
        if not pids:
            return None
        with open(f"/proc/{pids[0]}/cmdline", "rb") as cmdline:
            words = cmdline.read().rstrip(b"\0").decode(errors="replace").split("\0")
        return f"pid {pids[0]}: {' '.join(' '.join(words).split())}"  # one line, even for a `python -c` script
    except (OSError, IndexError):
        return None
