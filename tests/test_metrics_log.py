import json
import math

import pytest

from gopo_online.metrics_log import MetricsLogger, read_metrics


def test_log_writes_one_json_line_per_event_and_reads_back(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"reward/joint": 0.5, "episode/count": 1}, "episode", {"persona_group": "a"}, time_s=100.0)
        log.log(7, {"loss/cs": 1.25}, "learner", time_s=101.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    events, offset = read_metrics(tmp_path / "metrics.jsonl")
    assert offset == (tmp_path / "metrics.jsonl").stat().st_size
    assert events[0] == {
        "time": 100.0,
        "step": 1,
        "kind": "episode",
        "metrics": {"reward/joint": 0.5, "episode/count": 1.0},
        "payload": {"persona_group": "a"},
    }
    assert events[1]["kind"] == "learner" and "payload" not in events[1]
    # nothing new: same offset, no events
    assert read_metrics(tmp_path / "metrics.jsonl", offset) == ([], offset)


def test_half_written_last_line_is_left_for_the_next_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"sys/in_flight": 3}, "system", time_s=1.0)
    full = json.dumps({"time": 2.0, "step": 2, "kind": "system", "metrics": {"sys/in_flight": 4}}) + "\n"
    with open(path, "a") as f:
        f.write(full[:20])  # a writer caught mid-line
    events, offset = read_metrics(path)
    assert [e["step"] for e in events] == [1]
    assert offset == path.stat().st_size - 20  # points at the fragment's start
    with open(path, "a") as f:
        f.write(full[20:])
    events, offset2 = read_metrics(path, offset)
    assert [e["step"] for e in events] == [2] and offset2 == path.stat().st_size


def test_resume_appends_and_seals_a_crashed_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"reward/cs": 0.1}, "episode")
    with open(path, "a") as f:
        f.write('{"time": 3, "step": 2, "ki')  # crash mid-write, never completed
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # the resumed run
        log.log(3, {"reward/cs": 0.3}, "episode")
    events, _ = read_metrics(path)
    # first run's event kept, fragment skipped (not glued onto the new line), resumed event readable
    assert [e["step"] for e in events] == [1, 3]


def test_metric_values_are_checked_and_non_finite_dropped(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        ev = log.log(1, {"a/x": math.nan, "a/y": math.inf, "a/z": True, "a/w": 2}, "system")
        assert ev["metrics"] == {"a/z": 1.0, "a/w": 2.0}
        with pytest.raises(ValueError, match="event kind"):
            log.log(1, {}, "bogus")
        with pytest.raises(TypeError, match="a/s"):
            log.log(1, {"a/s": "high"}, "system")
    assert read_metrics(tmp_path / "metrics.jsonl")[0][0]["metrics"] == {"a/z": 1.0, "a/w": 2.0}


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "metrics.jsonl")


def test_disabled_outputs_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", jsonl=False, tensorboard=False) as log:
        log.log(1, {"loss/cs": 1.0}, "learner")
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_are_written(tmp_path):
    # the legacy loader gives events as written (the other migrates simple_value into tensors)
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    with MetricsLogger(tmp_path, jsonl=False) as log:
        log.log(3, {"loss/expert": 0.25, "loss/cs": 1.5}, "learner", time_s=10.0)
        log.log(4, {"loss/expert": 0.125}, "learner", time_s=11.0)
        log.log(5, {}, "error", {"error": "boom"})  # no scalars: nothing for TensorBoard
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = [
        (ev.step, v.tag, v.simple_value) for ev in LegacyEventFileLoader(str(files[0])).Load() for v in ev.summary.value
    ]
    assert scalars == [(3, "loss/expert", 0.25), (3, "loss/cs", 1.5), (4, "loss/expert", 0.125)]
