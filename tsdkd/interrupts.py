"""How Ctrl-C and SIGTERM end a command (Terminated), and the signal handlers put back as they were."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived (a cluster preemption, `timeout`). A BaseException like KeyboardInterrupt, so that
    no `except Exception` on the way swallows it."""


def interruption(number: int) -> BaseException:
    """What the CLI ends with for signal `number`: KeyboardInterrupt for SIGINT, Terminated for SIGTERM."""
    return KeyboardInterrupt() if number == signal.SIGINT else Terminated()


def handle_interrupts(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """`handler` for Ctrl-C and SIGTERM, but where the process ignores one (a background job of a script): that one
    stays ignored. Returns the handlers replaced, for restore_handlers."""
    return {number: signal.signal(number, handler) for number in INTERRUPTS if signal.getsignal(number) is not signal.SIG_IGN}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers `signal.signal` returned, by signal number."""
    for number, handler in previous.items():
        # None: a handler set outside Python, which cannot be put back; the default is the closest.
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM arriving inside are recorded in the list, not raised (in the main thread: elsewhere no
    handler can be set, and the process takes them as it would anyway)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = handle_interrupts(lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        restore_handlers(previous)
