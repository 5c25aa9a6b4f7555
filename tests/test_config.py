"""The root config (gopo_online/config.py): every TOML config in the repo loads; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gopo_online.config import DEFAULT_CONFIG_PATH, ConfigError, GopoConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", ".tox", ".eggs", "__pycache__", "runs"}
NOT_CONFIGS = {"pyproject.toml", "ruff.toml", ".ruff.toml", "uv.toml", "poetry.lock", "Cargo.toml", "setup.toml"}


def _config_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*.toml"):
        rel = p.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.startswith(".venv") for part in rel.parts[:-1]) or p.name in NOT_CONFIGS:
            continue
        out.append(p)
    return sorted(out)


def test_default_config_is_found():
    assert DEFAULT_CONFIG_PATH in _config_files()


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_toml_config_loads(path: Path):
    assert isinstance(load_config(path), GopoConfig)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_bad_key_is_named_with_close_match(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "[learner]\nlrr = 1e-5\n"))
    assert "learner.lrr" in str(e.value) and "did you mean 'learner.lr'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "[learnr]\nlr = 1e-5\n"))
    assert "learnr" in str(e.value) and "'learner'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["rewards.tse_gama=0.8"])
    assert "rewards.tse_gama" in str(e.value) and "rewards.tse_gamma" in str(e.value)


def test_bad_value_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"learner\.lr"):
        load_config(_write(tmp_path, "[learner]\nlr = -1.0\n"))
    with pytest.raises(ConfigError, match=r"serving\.policy\.port"):
        load_config(overrides=["serving.policy.port=99999"])
    with pytest.raises(ConfigError, match="w_expert_end"):
        load_config(overrides=["rewards.w_expert_start=0.9", "rewards.w_expert_end=0.1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[learner\n"))


def test_overrides_parse_types():
    assert parse_override("learner.lr=2e-5") == (["learner", "lr"], 2e-5)
    assert parse_override("learner.zero_stage=2") == (["learner", "zero_stage"], 2)
    assert parse_override("run.resume=false") == (["run", "resume"], False)
    assert parse_override("run.name=fast") == (["run", "name"], "fast")  # bare word: kept as a string
    assert parse_override('run.name="a b"') == (["run", "name"], "a b")
    assert parse_override('simulator.scenarios=["ecommerce"]') == (["simulator", "scenarios"], ["ecommerce"])
    with pytest.raises(ConfigError):
        parse_override("learner.lr")
    cfg = load_config(
        overrides=["learner.lr=2e-5", "run.resume=false", "run.name=fast", "rewards.tse_weights=[0.5, 0.25, 0.25]"]
    )
    assert cfg.learner.lr == 2e-5 and cfg.run.resume is False and cfg.run.name == "fast"
    assert cfg.rewards.tse_weights == [0.5, 0.25, 0.25]
