"""docker-compose.yml: the cluster layout is consistent with the code and the config it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gopo_online import layout
from gopo_online.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def policy_health(services: dict) -> list[str]:
    return services["vllm-policy"]["healthcheck"]["test"]


def test_layout_argv_spells_config_and_overrides() -> None:
    assert layout.argv("controller", "c.toml", ["a.b=1"]) == ["train", "--no-spawn", "-c", "c.toml", "--set", "a.b=1"]
    with pytest.raises(ValueError, match="unknown service 'redis'"):
        layout.argv("redis", "c.toml")


def test_services_and_their_commands_match_the_cli_and_config() -> None:
    services = _compose()["services"]
    assert {"redis", "vllm-policy", "vllm-sim", "worker", "learner", "controller", "flower"} <= set(services)
    for name in ("worker", "learner", "controller", "vllm-policy"):
        cmd = services[name]["command"]
        # one source of truth: the commands tests/test_cluster_layout.py runs as processes on one box
        assert cmd == layout.argv(name, layout.COMPOSE_CONFIG), (name, cmd)
        assert services[name].get("image") == "gopo-online:latest"  # our CLI is the entrypoint
        cfg_path = cmd[cmd.index("-c") + 1]
        assert cfg_path.startswith("/config/")
        cfg = load_config(ROOT / "configs" / Path(cfg_path).name)  # the file the container reads, validated
        assert cfg.broker.url == "redis://redis:6379/0"
        assert cfg.serving.policy.url == "http://vllm-policy:8000"
        assert cfg.serving.simulator_server.url == "http://vllm-sim:8000"
    assert set(layout.SERVICES) <= set(services) and set(layout.START_ORDER) == set(layout.SERVICES)
    # `serve --start policy` listens where the others connect: the url's port, the one its healthcheck probes
    cfg = load_config(ROOT / "configs" / "cluster.toml")
    assert cfg.serving.policy.port in (None, 8000) and "localhost:8000" in " ".join(policy_health(services))
    # The learner writes adapters where the policy server reads them: the same volume at the same path.
    policy = services["vllm-policy"]
    assert any(v.startswith("runs:/runs") for v in policy["volumes"])
    assert cfg.serving.weight_transport == "lora"  # `serve` enables LoRA hot-load for this transport
    # A service that dies is restarted by compose (as `train` restarts its children on one machine).
    for name, svc in services.items():
        assert svc.get("restart") in ("on-failure", "unless-stopped", "always"), name
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
