"""`workers.sync`: the synchronous baseline of `bench --only async` dispatches one batch per learner push."""

from __future__ import annotations

import pytest

from gopo_online.config import ConfigError, load_config
from workers.dispatch import sync_allowance


def test_one_batch_per_push_plus_a_replacement_per_error():
    assert sync_allowance(4, steps_done=0, errors=0, dispatched=0) == 4
    assert sync_allowance(4, steps_done=0, errors=0, dispatched=4) == 0  # waits for the learner
    assert sync_allowance(4, steps_done=0, errors=1, dispatched=4) == 1  # the learner will not train on an error
    assert sync_allowance(4, steps_done=1, errors=1, dispatched=5) == 4
    assert sync_allowance(4, steps_done=3, errors=0, dispatched=20) == 0  # never negative


def test_sync_needs_no_staleness_and_a_push_per_step():
    cfg = load_config(overrides=["workers.sync=true", "learner.max_staleness=0", "learner.push_every=1"])
    assert cfg.workers.sync
    with pytest.raises(ConfigError, match="max_staleness = 0"):
        load_config(overrides=["workers.sync=true"])  # the default max_staleness is 2
