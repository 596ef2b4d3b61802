"""An exclusive lock on an output folder while a command writes into it."""

from __future__ import annotations

import contextlib
import fcntl
import os
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
            raise TsdkdError(f"--out {folder} is in use by another running tsdkd command (this one: `tsdkd {command}`); "
                             "wait for it to end, or choose another --out") from None
        except OSError as error:  # a filesystem without locks
            print(f"note: cannot lock --out {folder} ({error.strerror}); do not run two commands into it at once")
        yield
    finally:
        _held.discard(handle)
        os.close(handle)
