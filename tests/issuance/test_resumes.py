"""The queue of orders resumed after a restart: a few at a time, oldest first, a client's
own order at once."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.resumes import ResumeQueue
from csrproxy.state.database import OrderRow


def rows(n: int) -> list[OrderRow]:
    return [OrderRow(f"o{i}", f"k{i}", b"", [f"n{i}"], status="pending") for i in range(n)]


class ResumeQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.started: list[str] = []
        self.ends: dict[str, Deferred[None]] = {}

    def start(self, row: OrderRow) -> Deferred[None]:
        self.started.append(row.id)
        d: Deferred[None] = Deferred()
        self.ends[row.id] = d
        return d

    def test_at_most_at_once_run_and_each_end_starts_the_next_oldest_first(self) -> None:
        queue = ResumeQueue(self.start, at_once=3)
        queue.add(rows(10))
        self.assertEqual(self.started, ["o0", "o1", "o2"])
        self.assertEqual((queue.running, len(queue)), (3, 7))
        self.ends["o1"].callback(None)
        self.assertEqual(self.started[-1], "o3")
        self.ends["o0"].errback(RuntimeError("failed"))  # a failure frees its turn too
        self.assertEqual(self.started[-1], "o4")
        for i in range(2, 10):
            if f"o{i}" in self.ends and not self.ends[f"o{i}"].called:
                self.ends[f"o{i}"].callback(None)
        for d in list(self.ends.values()):
            if not d.called:
                d.callback(None)
        self.assertEqual(self.started, [f"o{i}" for i in range(10)])
        self.assertEqual((queue.running, len(queue)), (0, 0))

    def test_a_client_asking_again_starts_its_order_at_once(self) -> None:
        queue = ResumeQueue(self.start, at_once=2)
        queue.add(rows(6))
        queue.promote("k5")
        self.assertEqual(self.started, ["o0", "o1", "o5"])
        self.assertEqual(queue.running, 2, "a promoted order does not take a turn")
        queue.promote("k5")  # already started: nothing
        queue.promote("unknown")
        self.assertEqual(len(self.started), 3)
        self.ends["o0"].callback(None)
        self.assertEqual(self.started[-1], "o2")

    def test_a_row_that_cannot_start_does_not_stop_the_others(self) -> None:
        def start(row: OrderRow) -> Deferred[None]:
            if row.id == "o1":
                raise ValueError("unusable")
            return self.start(row)

        queue = ResumeQueue(start, at_once=2)
        queue.add(rows(4))
        self.assertEqual(self.started, ["o0", "o2"])
