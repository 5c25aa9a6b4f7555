"""Task helpers that need no broker: transient-error classification, error records, request validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gopo_online.stream import EpisodeRequest
from workers.app import error_trajectory
from workers.rollout import TransientError, is_transient


class APIConnectionError(Exception):
    """Same name as openai's: classified without importing openai."""


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("slow"), True),
        (TransientError("try later"), True),
        (APIConnectionError("down"), True),
        (ValueError("bad scenario"), False),
        (KeyError("persona"), False),
        (NotImplementedError("not wired"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_error_trajectory_is_a_valid_record() -> None:
    req = EpisodeRequest(episode_id="e1", scenario_id="ecommerce", persona_id="p", seed=1)
    t = error_trajectory(req, "failure after 0 retries: ValueError: x", worker="w", started_at=0.0)
    assert t.status == "error" and t.error and t.turns == () and t.episode_id == "e1"
    assert type(t).from_json(t.to_json()) == t


def test_episode_request_rejects_unknown_keys_and_empty_ids() -> None:
    with pytest.raises(ValidationError):
        EpisodeRequest(episode_id="", scenario_id="ecommerce", persona_id="p")
    with pytest.raises(ValidationError):
        EpisodeRequest.model_validate({"episode_id": "e", "scenario_id": "s", "persona_id": "p", "extra": 1})
