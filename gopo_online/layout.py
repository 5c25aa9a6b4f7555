"""The cluster layout: which `gopo-online` command each service runs. The one place these commands are spelled.

docker-compose.yml's services run exactly `argv(service, "/config/cluster.toml")` (tests/test_compose.py checks
it), and tests/test_cluster_layout.py starts the same commands as separate processes on one box, with
configs/cluster-local.toml and `--set` overrides (ports, queue names, a tiny budget). docs/cluster.md lists them.

The policy server is `gopo-online serve --start policy`: it starts vLLM on serving.policy.host:port even though
serving.policy.url is set, because in the cluster config that URL is how every other part reaches this server.
Workers run as many copies as wanted (`docker compose up --scale worker=N`); every other service runs once.
Imports nothing: `gopo-online --help` stays instant and tests read it without the stack.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SERVICES: dict[str, tuple[str, ...]] = {
    "vllm-policy": ("serve", "--start", "policy"),
    "learner": ("learner",),
    "worker": ("worker",),
    "controller": ("train", "--no-spawn"),
}
"""Compose service name -> the `gopo-online` subcommand and its flags (before `-c CONFIG`)."""

START_ORDER = ("vllm-policy", "learner", "worker", "controller")
"""The order to start them in (compose's depends_on says the same): the server and the learner take longest to
be ready; the controller dispatches only once it has refit the server to the learner's last pushed version."""

COMPOSE_CONFIG = "/config/cluster.toml"
"""Where the containers read the config (./configs is mounted at /config)."""


def argv(service: str, config: str | Path, sets: Iterable[str] = ()) -> list[str]:
    """The service's command line after `gopo-online`: its subcommand, `-c config`, then `--set key=value` each."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; the layout has {', '.join(SERVICES)}")
    return [*SERVICES[service], "-c", str(config), *(a for s in sets for a in ("--set", s))]
