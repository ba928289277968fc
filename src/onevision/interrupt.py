"""Ctrl-C at a safe point: the first SIGINT only sets an event that a loop checks between steps; a second one
raises KeyboardInterrupt at once.

Python raises KeyboardInterrupt between any two bytecodes, and some places do not let it out: a finalizer or a
weakref callback prints "Exception ignored" and goes on, and library code catching broadly (Ray's task code) turns
it into something else. Loops that keep going after Ctrl-C (the chat session keeps its model and history, a batch
job keeps what it wrote) stop where their state is whole instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def deferred_interrupt(on_first: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Within the block, the first Ctrl-C sets the yielded event (and calls `on_first`, e.g. to say what happens
    now); a second raises KeyboardInterrupt where the code is. The previous handler comes back on exit. Off the
    main thread (Python runs signal handlers there only) nothing is installed and the event is never set."""
    interrupted = threading.Event()

    def handler(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        if on_first is not None:
            on_first()

    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["deferred_interrupt"]
