"""`bench --only loop` parts: the loop's rate from a request log, and the replay (against the load server here;
the bench replays on a real vLLM server)."""

from __future__ import annotations

import json

import pytest

from gopo_online.bench_loop import _metrics, loop_rate, replay, reward_curve
from gopo_online.loadserver import LoadServer


def _req(t: float, lat: float, n: int, prompt: int = 5) -> dict:
    return {"t": t, "latency_s": lat, "completion_tokens": n, "prompt_tokens": prompt,
            "prompt_token_ids": list(range(prompt)), "temperature": 1.0}  # fmt: skip


def test_loop_rate_spans_first_start_to_last_end():
    r = loop_rate([_req(10.0, 2.0, 20), _req(11.0, 3.0, 30), _req(13.0, 1.0, 10)])
    assert r["span_s"] == 4.0 and r["generated_tokens"] == 60 and r["tok_per_s"] == 15.0
    assert r["mean_in_flight"] == 1.5 and r["prompt_tok_per_s"] == 15 / 4
    with pytest.raises(ValueError, match="empty"):
        loop_rate([])


def test_replay_sends_the_same_work():
    reqs = [_req(float(i), 0.1, 3 + i % 4) for i in range(12)]
    with LoadServer() as srv:
        r = replay(srv.base_url, "policy", reqs, concurrency=4)
        assert srv.requests == 13  # 1 warm-up + every request of the log
    assert r["generated_tokens"] == sum(q["completion_tokens"] for q in reqs) and r["tok_per_s"] > 0
    with pytest.raises(ValueError, match="no replayable"):
        replay("http://127.0.0.1:1/v1", "policy", [_req(0.0, 0.1, 0)], concurrency=1)


def test_metrics_counts_episodes_and_steps(tmp_path):
    lines = [{"time": 0.0, "kind": "episode", "step": 1}, {"time": 30.0, "kind": "learner", "step": 2},
             {"time": 60.0, "kind": "episode", "step": 2}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m = _metrics(tmp_path)
    assert m == {"episodes": 2.0, "learner_steps": 2.0, "episodes_per_min": 2.0, "prefix_cache_hit_rate": None}
    lines += [{"time": 40.0, "kind": "system", "metrics": {"sys/prefix_cache_hit_rate": 0.5}},
              {"time": 50.0, "kind": "system", "metrics": {"sys/prefix_cache_hit_rate": 0.625}}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert _metrics(tmp_path)["prefix_cache_hit_rate"] == 0.625  # the last: the server's counters are cumulative


def test_reward_curve_bins_learner_rewards_by_wall_clock(tmp_path):
    lines = [{"time": 100.0, "kind": "episode", "metrics": {}},
             {"time": 130.0, "kind": "learner", "step": 1, "metrics": {"reward/joint": 0.1}},
             {"time": 150.0, "kind": "learner", "step": 2, "metrics": {"reward/joint": 0.3}},
             {"time": 190.0, "kind": "learner", "step": 3, "metrics": {"reward/joint": 0.5}},
             {"time": 220.0, "kind": "learner", "step": 4, "metrics": {"reward/joint": 0.7}},
             {"time": 220.0, "kind": "push", "metrics": {}}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    c = reward_curve(tmp_path, bin_s=60.0)
    assert c["points"] == [(30.0, 0.1), (50.0, 0.3), (90.0, 0.5), (120.0, 0.7)]
    assert c["bins"] == [(0.0, 0.2), (60.0, 0.5), (120.0, 0.7)]
    assert c["late_mean"] == pytest.approx(0.6)  # steps at or after half the 120 s span
    assert reward_curve(tmp_path / "missing") == {"points": [], "bins": [], "late_mean": None}


def test_baseline_worktree_runs_that_commits_code(tmp_path):
    """`bench --only loop` runs the baseline's `train` from a worktree of that commit in this environment: the child
    imports the worktree's packages (sys.path before the editable install's finder), and the worktree goes away."""
    import subprocess
    import sys
    from pathlib import Path

    from gopo_online import bench_loop

    repo = Path(bench_loop.__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no commit to make a worktree of")
    tree = bench_loop._worktree("HEAD", tmp_path / "tree")
    try:
        code = "import gopo_online, workers, trainer, simulator; print(gopo_online.__file__, workers.__file__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree,
                             env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=True).stdout  # fmt: skip
        assert all(Path(p).resolve().is_relative_to(tree.resolve()) for p in out.split())
    finally:
        bench_loop._drop_worktree(tree)
    assert not tree.exists()
    with pytest.raises(RuntimeError, match="git worktree add no-such-ref failed"):
        bench_loop._worktree("no-such-ref", tmp_path / "bad")


def test_only_takes_comma_separated_names(tmp_path):
    from gopo_online.bench import main
    from gopo_online.config import load_config

    with pytest.raises(SystemExit, match=r"unknown benchmark\(s\) \['nosuch'\]"):
        main(load_config(), ["math,nosuch"], tmp_path / "bench.json")
    rows = main(load_config(), ["math,"], tmp_path / "bench.json")
    assert rows and {r["bench"] for r in rows} == {"math"}


def test_train_runs_report_the_peak_rss_of_their_whole_process_tree():
    """The loop bench's peak-RSS row covers train's children (servers, workers, learner): here a grandchild holds
    ~300 MiB for a few seconds while the direct child holds almost nothing."""
    import sys

    from gopo_online.bench_loop import run_sampling_rss

    grandchild = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}]); print('done')"
    got = run_sampling_rss([sys.executable, "-c", child], timeout=60, every_s=0.2)
    assert got.returncode == 0 and got.stdout.strip() == "done"
    assert 300 < got.peak_rss_mb < 1000
    failed = run_sampling_rss([sys.executable, "-c", "import sys; sys.exit('bad input')"], timeout=60)
    assert failed.returncode == 1 and "bad input" in failed.stderr
