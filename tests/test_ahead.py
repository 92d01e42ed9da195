"""run_ahead: work done ahead in one thread, results in order, errors where they arose, no thread left behind."""

from __future__ import annotations

import random
import threading
import time

import pytest

from kdcache.ahead import run_ahead


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kdcache-ahead")]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_results_come_in_order_whatever_each_item_takes(depth):
    rng = random.Random(depth)

    def work(item):
        time.sleep(rng.random() * 0.003)
        return item * item

    assert list(run_ahead(iter(range(40)), work, depth=depth)) == [i * i for i in range(40)]
    assert not ahead_threads()


@pytest.mark.parametrize("depth", [1, 2])
def test_items_are_drawn_no_further_than_depth_ahead_of_the_consumer(depth):
    drawn: list[int] = []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    for consumed, result in enumerate(run_ahead(items(), lambda item: item, depth=depth)):
        assert result == consumed
        assert len(drawn) == min(10, consumed + 1 + depth)  # this one, and at most depth more, are drawn


def test_the_work_runs_on_another_thread_while_the_consumer_holds_a_result():
    started = threading.Event()
    where: list[str] = []

    def work(item):
        where.append(threading.current_thread().name)
        if item == 1:
            started.set()
        return item

    results = run_ahead(iter(range(3)), work, depth=1)
    assert next(results) == 0
    assert started.wait(5)  # item 1 is worked on before the consumer asks for it
    assert list(results) == [1, 2]
    assert all(name.startswith("kdcache-ahead") for name in where)


def test_an_error_reaches_the_consumer_after_the_items_before_it():
    def work(item):
        if item == 3:
            raise KeyError(f"item {item} is damaged")
        return item

    got = []
    with pytest.raises(KeyError, match="item 3 is damaged"):
        for result in run_ahead(iter(range(10)), work, depth=2):
            got.append(result)
    assert got == [0, 1, 2]
    assert not ahead_threads()


def test_closing_early_cancels_the_work_not_started_and_leaves_no_thread():
    done: list[int] = []

    def work(item):
        time.sleep(0.2)
        done.append(item)
        return item

    results = run_ahead(iter(range(100)), work, depth=3)
    assert [next(results) for _ in range(2)] == [0, 1]
    results.close()  # item 2 is being worked on (or about to be), items 3 and 4 wait in the queue
    assert not ahead_threads()
    assert done in ([0, 1], [0, 1, 2])  # the queued ones were cancelled, and nothing runs after the close
    time.sleep(0.3)
    assert done in ([0, 1], [0, 1, 2])


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth=0"):
        list(run_ahead([1], lambda item: item, depth=0))
