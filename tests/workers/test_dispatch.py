"""InFlight: bounded dispatch, deadlines, re-dispatch under the same id, hand-back and adoption (no broker)."""

from __future__ import annotations

from gopo_online.stream import EpisodeRequest
from workers.dispatch import InFlight


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _request(index: int, version: int) -> EpisodeRequest:
    return EpisodeRequest(episode_id=f"ep-{index:03d}", scenario_id="s", persona_id="p", seed=index,
                          policy_version=version)  # fmt: skip


def _make(max_in_flight: int = 3, deadline_s: float = 10.0) -> tuple[InFlight, list[dict], Clock]:
    sent: list[dict] = []
    clock = Clock()
    return InFlight(_request, sent.append, max_in_flight=max_in_flight, deadline_s=deadline_s, clock=clock), sent, clock


def test_fill_respects_bound_budget_and_hold_back() -> None:
    inflight, sent, _ = _make(3)
    assert inflight.fill(0, 0, budget_left=2) == ["ep-000", "ep-001"]  # budget smaller than the bound
    assert inflight.fill(2, 0, budget_left=5) == ["ep-002"]  # bound reached
    assert inflight.fill(3, 0, budget_left=5) == []
    assert inflight.finished("ep-001") and not inflight.finished("ep-001")  # a duplicate event counts once
    assert inflight.fill(3, 7, budget_left=5, hold_back=True) == []
    assert inflight.fill(3, 7, budget_left=5) == ["ep-003"]
    assert [p["episode_id"] for p in sent] == ["ep-000", "ep-001", "ep-002", "ep-003"]
    assert sent[-1]["policy_version"] == 7 and len(inflight) == 3


def test_expire_and_redispatch_same_id_fresh_deadline() -> None:
    inflight, sent, clock = _make(2, deadline_s=10.0)
    inflight.fill(0, 0, budget_left=2)
    clock.t = 8.0
    assert inflight.redispatch(["ep-001", "ep-999"]) == ["ep-001"]  # unknown ids are not ours: skipped
    assert sent[-1] == sent[1] and inflight.redispatched == 1
    clock.t = 11.0
    assert inflight.expire() == ["ep-000"]  # ep-001's deadline moved to 18 with the re-dispatch
    assert "ep-001" in inflight and "ep-000" not in inflight
    clock.t = 19.0
    assert inflight.expire() == ["ep-001"]


def test_hand_back_then_adopt_in_next_run() -> None:
    inflight, _, _ = _make(3)
    inflight.fill(0, 2, budget_left=3)
    inflight.finished("ep-000")
    back = inflight.handed_back()
    assert [p["episode_id"] for p in back] == ["ep-001", "ep-002"]

    nxt, sent, _ = _make(3)
    assert nxt.adopt(back, resend=False) == ["ep-001", "ep-002"] and sent == []
    assert nxt.fill(3, 2, budget_left=10) == ["ep-003"]  # adopted episodes take slots
    assert nxt.finished("ep-002")
    again, sent2, _ = _make(3)
    again.adopt(back, resend=True)
    assert [p["episode_id"] for p in sent2] == ["ep-001", "ep-002"]


def test_controller_state_keeps_handed_back_and_reads_old_files(tmp_path) -> None:
    import json

    from workers.controller import ControllerState

    path = tmp_path / "controller.json"
    path.write_text(json.dumps({"next_episode": 7, "dispatched": 7, "finished": 5, "errors": 0, "lost": 0, "runs": []}))
    old = ControllerState.load(path)  # written before supervision existed
    assert old.next_episode == 7 and old.handed_back == [] and old.restarts == 0
    inflight, _, _ = _make(3)
    inflight.fill(7, 1, budget_left=2)
    old.handed_back = inflight.handed_back()
    old.save(path)
    again = ControllerState.load(path)
    assert [p["episode_id"] for p in again.handed_back] == ["ep-007", "ep-008"]
