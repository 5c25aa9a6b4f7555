"""The learner's batches keep GRPO groups whole (trainer.learner.group_batch, pure)."""

from __future__ import annotations

from trainer.learner import _batches, group_batch
from trainer.synthetic import make_trajectory


def _t(fake_tok, ep, group=""):
    return make_trajectory(fake_tok, ep, 1).model_copy(update={"group_id": group, "episode_id": f"ep{ep}"})


def _ids(ts):
    return [t.episode_id for t in ts]


def test_whole_groups_first_and_partial_groups_wait(fake_tok):
    # arrival order interleaves two groups of 4 (workers finish out of order)
    pending = [_t(fake_tok, i, g) for i, g in enumerate("ABABAABB")]
    batch, rest = group_batch(pending[:6], 4, 4)
    assert _ids(batch) == ["ep0", "ep2", "ep4", "ep5"] and _ids(rest) == ["ep1", "ep3"]  # group A whole
    batch, rest = group_batch(rest, 4, 4)
    assert batch == [] and len(rest) == 2  # B incomplete: wait
    batch, rest = group_batch(rest + pending[6:], 4, 4)
    assert _ids(batch) == ["ep1", "ep3", "ep6", "ep7"] and rest == []


def test_force_tops_up_and_ungrouped_episodes_are_complete(fake_tok):
    pending = [_t(fake_tok, 0, "A"), _t(fake_tok, 1), _t(fake_tok, 2, "B"), _t(fake_tok, 3, "A")]
    assert group_batch(pending, 2, 4) == ([], pending)  # one complete (ungrouped) episode is not a batch of 2
    batch, rest = group_batch(pending, 3, 4, force=True)
    assert _ids(batch) == ["ep1", "ep0", "ep2"] and _ids(rest) == ["ep3"]


class _Consumer:
    def __init__(self, arrivals):
        self.arrivals = list(arrivals)

    def get_batch(self, n, timeout_s):
        out, self.arrivals = self.arrivals[:n], self.arrivals[n:]
        return out


def test_batches_yield_whole_groups_from_a_consumer(fake_tok):
    arrivals = [_t(fake_tok, i, g) for i, g in enumerate("ABABAABB")]
    consumer = _Consumer(arrivals)
    got = []
    for batch in _batches(consumer, 4, 0.0, should_stop=lambda: not consumer.arrivals and len(got) >= 2, group_size=4):
        got.append(sorted({t.group_id for t in batch}))
    assert got == [["A"], ["B"]]


class _FlakyBroker(_Consumer):
    """The broker restarted or paused: `get_batch` raises kombu's OperationalError `outage` times first."""

    def __init__(self, arrivals, outage):
        super().__init__(arrivals)
        self.outage = outage
        from kombu.exceptions import OperationalError

        self.broker_errors = (OperationalError,)

    def get_batch(self, n, timeout_s):
        if self.outage:
            from kombu.exceptions import OperationalError

            self.outage -= 1
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return super().get_batch(n, timeout_s)


def test_batches_wait_out_a_broker_outage_then_give_up_after_max_outage(fake_tok):
    import pytest
    from kombu.exceptions import OperationalError

    logged = []
    consumer = _FlakyBroker([_t(fake_tok, i) for i in range(2)], outage=3)
    batches = _batches(consumer, 2, 0.0, max_outage_s=5.0, retry_s=0.0, log=logged.append)
    assert _ids(next(batches)) == ["ep0", "ep1"]  # the learner lived through the outage (it used to exit 3)
    assert "unreachable" in logged[0] and "back after" in logged[1]
    down = _FlakyBroker([], outage=1 << 30)
    with pytest.raises(OperationalError):
        next(_batches(down, 2, 0.0, max_outage_s=0.05, retry_s=0.01, log=logged.append))
