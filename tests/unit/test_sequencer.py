"""seq_id ordering: in order, holes filled by skip, gaps given up after a timeout."""

from actors.sequencer import Sequencer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_in_order_requests_run_at_once():
    seq = Sequencer(gap_timeout_s=5)
    assert seq.submit("m", 0, "create") == ["create"]
    assert seq.submit("m", 1, "a") == ["a"]
    assert seq.submit("m", 2, "b") == ["b"]


def test_out_of_order_requests_wait_for_the_earlier_ones():
    seq = Sequencer(gap_timeout_s=5)
    seq.submit("m", 0, "create")
    assert seq.submit("m", 3, "c") == []
    assert seq.submit("m", 2, "b") == []
    assert seq.submit("m", 1, "a") == ["a", "b", "c"]


def test_skip_fills_a_hole():
    seq = Sequencer(gap_timeout_s=5)
    seq.submit("m", 0, "create")
    assert seq.submit("m", 2, "b") == []
    assert seq.skip("m", 1) == ["b"]
    assert seq.next_deadline() is None


def test_skip_ahead_of_time_is_remembered():
    seq = Sequencer(gap_timeout_s=5)
    seq.submit("m", 0, "create")
    assert seq.skip("m", 2) == []
    assert seq.submit("m", 1, "a") == ["a"]
    assert seq.submit("m", 3, "c") == ["c"]


def test_gap_is_given_up_after_the_timeout():
    clock = Clock()
    seq = Sequencer(gap_timeout_s=5, clock=clock)
    seq.submit("m", 0, "create")
    seq.submit("m", 3, "c")
    clock.now = 2.0
    seq.submit("m", 4, "d")
    assert seq.expire() == []
    assert seq.next_deadline() == 5.0
    clock.now = 5.0
    assert seq.expire() == ["c", "d"]
    assert seq.submit("m", 1, "late") == ["late"]  # late arrivals still run


def test_models_are_independent_and_unordered_requests_pass():
    seq = Sequencer(gap_timeout_s=5)
    seq.submit("a", 0, "ca")
    seq.submit("b", 0, "cb")
    assert seq.submit("a", 2, "a2") == []
    assert seq.submit("b", 1, "b1") == ["b1"]
    assert seq.submit("a", None, "json") == ["json"]


def test_forget_releases_what_waits():
    seq = Sequencer(gap_timeout_s=5)
    seq.submit("m", 0, "create")
    seq.submit("m", 5, "e")
    assert seq.forget("m") == ["e"]
    assert seq.next_deadline() is None
