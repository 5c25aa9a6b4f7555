"""A push that fails because a policy server died mid-push does not end the learner (the server fault)."""

from __future__ import annotations

import pytest

from gopo_online.serving.weights import WeightPushError
from trainer.learner import Learner


def test_failed_push_is_logged_and_not_announced(tmp_path):
    from gopo_online.config import load_config

    cfg = load_config(overrides=[f"run.output_dir='{tmp_path}'"])
    announced, logged = [], []

    def publish(version, exported):
        raise WeightPushError("POST http://127.0.0.1:1/v1/load_lora_adapter failed: ConnectError")

    learner = Learner(cfg, publish=publish, announce=lambda v, e: announced.append(v), log=logged.append)
    learner.version = 3
    learner._publish({})  # the server is the controller's to restart and refit; the next push catches up
    assert learner.push_failures == 1 and announced == []
    assert "push of v3 failed" in logged[0] and "ConnectError" in logged[0]

    def broken(version, exported):  # anything else is a bug: it still ends the step
        raise ValueError("not a push failure")

    learner.publish = broken
    with pytest.raises(ValueError):
        learner._publish({})
