"""The background iterator the loader makes its batches with."""

import threading

import pytest

from softlabels.background import Background


def running(name):
    return [t for t in threading.enumerate() if t.name == name]


@pytest.mark.parametrize("group", [1, 3, 7])
def test_items_arrive_in_order_and_the_thread_ends(group):
    # 100 items: the last list of 3 or 7 is cut short
    with Background(lambda: (i * i for i in range(100)), ahead=6, group=group, name="bg-order") as items:
        assert list(items) == [i * i for i in range(100)]
    assert running("bg-order") == []


@pytest.mark.parametrize("ahead, group", [(4, 1), (8, 2), (16, 4)])
def test_the_producer_stays_about_ahead_items_in_front(ahead, group):
    made = []

    def produce():
        for i in range(100):
            made.append(i)
            yield i

    with Background(produce, ahead=ahead, group=group, name="bg-ahead") as items:
        for taken, item in enumerate(items, start=1):
            # the queued lists (ahead // group - 1 of them), the one the producer fills or waits to
            # put, and the rest of the one the consumer takes from
            assert len(made) <= taken + ahead + group - 1
    assert made == list(range(100))


@pytest.mark.parametrize("group", [1, 4])
def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_items_before_it(group):
    def produce():
        yield 1
        yield 2
        raise ValueError("chunk 7 is damaged")

    got = []
    with pytest.raises(ValueError, match="chunk 7 is damaged"):
        with Background(produce, ahead=8, group=group, name="bg-error") as items:
            for item in items:
                got.append(item)
    assert got == [1, 2] and running("bg-error") == []


def test_a_consumer_that_stops_early_stops_the_producer_and_runs_its_clean_up():
    cleaned = threading.Event()

    def produce():
        try:
            i = 0
            while True:  # endless: only a stop ends it
                yield i
                i += 1
        finally:
            cleaned.set()

    with Background(produce, ahead=4, group=2, name="bg-stop") as items:
        for item in items:
            if item == 5:
                break
    assert cleaned.is_set() and running("bg-stop") == []
