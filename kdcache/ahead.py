"""Work a few items ahead in one background thread, results in order.

Precompute prepares the next blocks while the teacher scores the current one, and training moves
the next batch to the GPU (decoding and replaying it there on the device path) while the student
steps on the current one. Both are :func:`run_ahead`: items are drawn from their iterator in the
calling thread, as results are asked for (so a lazily claimed unit is claimed only when it is
about to be worked on), and ``work`` runs on them in one other thread.

An exception raised by ``work`` reaches the caller at the item that raised it, after the items
before it. Closing the generator early (a ``break``, an error in the consumer) cancels the work
not yet started and waits for the one item in progress, so no thread outlives the loop.

On CUDA the work runs on a stream of its own (:func:`on_stream`), and the consumer's stream waits
for it before using what it made (:func:`wait_for`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_ahead(items: Iterable[Item], work: Callable[[Item], Result], *, depth: int) -> Iterator[Result]:
    """``work(item)`` for each item, in order, with up to ``depth`` items worked on before they are asked for."""
    if depth < 1:
        raise ValueError(f"depth={depth!r}: expected at least one item ahead")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-ahead")
    queued: deque = deque()
    try:
        for item in items:
            queued.append(pool.submit(work, item))
            if len(queued) > depth:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def on_stream(stream: torch.cuda.Stream, work: Callable[..., Result], *args) -> tuple[Result, torch.cuda.Event]:
    """``work(*args)`` with ``stream`` (and its device) current in this thread, and an event recorded after it."""
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        result = work(*args)
        return result, stream.record_event()


def wait_for(ready: torch.cuda.Event, tensors, device) -> None:
    """The current stream of ``device`` waits for ``ready``; ``tensors``, made on the other stream, are not reused
    by the allocator before this stream is done with them."""
    current = torch.cuda.current_stream(device)
    current.wait_event(ready)
    for tensor in tensors:
        tensor.record_stream(current)
