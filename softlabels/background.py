"""An iterator run in a background thread, a bounded number of items ahead of its consumer.

The loader makes its batches this way (read, checked, cut from their windows) so that the thread
that trains spends no time on them. An exception in the background is raised in the consumer, after
the items made before it; leaving the ``with`` block, whether the items ran out or the consumer
stopped early, stops and joins the thread. Items cross between the threads ``group`` at a time:
each crossing wakes the other thread and hands over the interpreter lock, which cost the loader a
fifth of its time at one batch of 256 rows per crossing.

Example::

    with Background(lambda: (i * i for i in range(10)), ahead=4, group=2) as squares:
        assert list(squares) == [i * i for i in range(10)]
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Generator, Iterator

_POLL_SECONDS = 0.1  # how often a producer blocked on a full queue looks for a stop


class Background:
    """Iterates the generator ``make()`` in a thread named ``name``, about ``ahead`` items ahead of the
    consumer, handing them over in lists of ``group``: the lists queued (``ahead // group - 1``, at
    least one), the list being filled and the rest of the one being consumed."""

    _END = object()

    def __init__(self, make: Callable[[], Generator[Any, None, None]], ahead: int, *, group: int = 1, name: str = "background"):
        self._group = max(1, group)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead // self._group - 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        while self._thread.is_alive():  # a producer blocked on a full queue sees the stop at its next poll
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=_POLL_SECONDS)
        self._thread.join()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield from item

    def _run(self, make: Callable[[], Generator[Any, None, None]]) -> None:
        made: list[Any] = []
        try:
            # closing: a producer stopped early still runs its own clean-up (its ``with`` blocks) here
            with contextlib.closing(make()) as items:
                for item in items:
                    made.append(item)
                    if len(made) == self._group:
                        if not self._put(made):
                            return
                        made = []
            if made and not self._put(made):
                return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which raises it after the items made before it
            if not made or self._put(made):
                self._put(_Raised(exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error
