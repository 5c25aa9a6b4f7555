"""A real `gopo-online worker` (Celery, threads pool, the real `run_episode` task) whose rollout is a stub that
holds each episode for $STUB_HOLD_S seconds: what the fault tests kill -9 mid-episode. Config from $STUB_CFG
(JSON of a GopoConfig)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gopo_online.config import GopoConfig  # noqa: E402
from gopo_online.types import Trajectory, Turn, UserTurnMeta  # noqa: E402
from workers.app import run_worker  # noqa: E402
from workers.rollout import WorkerContext  # noqa: E402


def rollout(req, ctx) -> Trajectory:
    print(f"playing {req.episode_id}", flush=True)
    time.sleep(float(os.environ.get("STUB_HOLD_S", "0.2")))
    turn = Turn(index=1, user_utterance="hi", user_meta=UserTurnMeta(intent="greet", emotion="calm", satisfaction=4,
                stop=True), expert_skills=("greet",), cs_reply="Hello!", cs_action="chat")  # fmt: skip
    return Trajectory(episode_id=req.episode_id, scenario_id=req.scenario_id, persona_id=req.persona_id,
                      seed=req.seed, turns=(turn,), finished=True)  # fmt: skip


if __name__ == "__main__":
    cfg = GopoConfig.model_validate_json(os.environ["STUB_CFG"])
    run_worker(cfg, WorkerContext(cfg=cfg, broker_url=cfg.broker.url, rollout_fn=rollout))
