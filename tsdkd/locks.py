"""An exclusive lock on an output folder while a command writes into it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from tsdkd.errors import TsdkdError


@contextlib.contextmanager
def exclusive_use(folder: Path, command: str) -> Iterator[None]:
    """Held while `tsdkd <command>` writes into `folder`. A rerun continues what is there, so a second command
    into the same folder (a job submitted twice, a requeue while the first still runs) is refused instead of
    writing beside the first. The kernel drops the lock when the process ends, however it ends."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TsdkdError(f"--out {folder} is in use by another running `tsdkd {command}`; wait for it to end, "
                             "or choose another --out") from None
        yield
    finally:
        os.close(handle)
