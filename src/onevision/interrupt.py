"""Ctrl-C that a loop cannot miss: an event set by the SIGINT handler, checked by the loop between its steps.

Python raises KeyboardInterrupt between any two bytecodes, and some places do not let it out: a finalizer or a
weakref callback prints "Exception ignored" and goes on, and library code that catches broadly (Ray's task code)
turns it into something else. Loops that must stop on Ctrl-C and keep their state (the chat session keeps its
model and history, a batch job what it wrote) also check the event between steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def interrupt_event(at_once: bool = True, on_first: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Within the block, Ctrl-C sets the yielded event, and the first one calls `on_first` (e.g. to say what happens
    now). at_once: the first Ctrl-C also raises KeyboardInterrupt where the code is, as Python does (the event still
    stops the loop should that exception be swallowed); otherwise only a second one raises. The previous handler
    comes back on exit. Off the main thread (Python runs signal handlers there only) nothing is
    installed and the event is never set."""
    interrupted = threading.Event()

    def handler(signum, frame):
        first = not interrupted.is_set()
        interrupted.set()
        if first and on_first is not None:
            on_first()
        if at_once or not first:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["interrupt_event"]
