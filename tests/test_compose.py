"""docker-compose.yml: the cluster layout is consistent with the code and the config it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gopo_online.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_their_commands_match_the_cli_and_config() -> None:
    services = _compose()["services"]
    assert {"redis", "vllm-policy", "vllm-sim", "worker", "learner", "controller", "flower"} <= set(services)
    for name in ("worker", "learner", "controller"):
        cmd = services[name]["command"]
        assert cmd[0] in {"worker", "learner", "train"}
        cfg_path = cmd[cmd.index("-c") + 1]
        assert cfg_path.startswith("/config/")
        cfg = load_config(ROOT / "configs" / Path(cfg_path).name)  # the file the container reads, validated
        assert cfg.broker.url == "redis://redis:6379/0"
        assert cfg.serving.policy.url == "http://vllm-policy:8000"
        assert cfg.serving.simulator_server.url == "http://vllm-sim:8000"
    # The learner writes adapters where the policy server reads them: the same volume at the same path.
    policy = services["vllm-policy"]
    assert any(v.startswith("runs:/runs") for v in policy["volumes"])
    assert "--enable-lora" in policy["command"]
    # Only loopback-published ports.
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose CLI not installed (apt-get install docker-compose)"
)
def test_docker_compose_config_accepts_the_file() -> None:
    env = {**os.environ, "GOPO_ADMIN_TOKEN": "t", "MODEL_DIR": "/tmp", "SIM_MODEL_DIR": "/tmp"}
    proc = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
