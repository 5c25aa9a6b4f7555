"""`bench --only scale` smoke: the real worker, agents, simulator and judge against the instant-reply load server,
on kombu's in-process memory transport (the bench itself uses a real embedded Redis)."""

from __future__ import annotations

from gopo_online.config import load_config
from workers.bench_scale import bench_scale


def test_scale_rows_with_every_episode_ok():
    cfg = load_config(overrides=["simulator.max_turns=2"])
    rows = {r["metric"]: r for r in bench_scale(cfg, levels=(2,), broker="memory://", episodes=4)}
    r = rows["N2.episodes_per_min"]
    assert r["episodes"] == 4 and r["errors"] == 0, r["first_error"]  # every reply parsed as its format demands
    assert r["value"] > 0 and 1 <= r["turns_per_episode"] <= 2 and r["queue_s_p50"] >= 0
    assert rows["N2.ingest_traj_per_s"]["value"] > 0 and rows["load_server_requests"]["value"] >= 4 * 3
