"""Benchmarks of the system's parts (run through `gopo-online bench`); each starts what it measures.

Rows follow `gopo_online.bench`: {"bench", "metric", "value", "unit", ...context}.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig

AMQP_URL = os.environ.get("GOPO_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1.0):
            return True
    except OSError:
        return False


def bench_broker(cfg: GopoConfig, n: int = 1000) -> list[Row]:
    """Trajectory stream throughput, 50 KB and 1.6 KB messages: embedded Redis, plus RabbitMQ when reachable."""
    from gopo_online.broker import EmbeddedRedis
    from gopo_online.stream import bench_stream

    rows: list[Row] = []
    targets: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp)) as redis:
        targets.append(("embedded-redis", redis.url))
        if _reachable(AMQP_URL):
            targets.append(("rabbitmq", AMQP_URL))
        for name, url in targets:
            for size in (50_000, 1_600):
                r = bench_stream(url, n=n, size_bytes=size)
                for key in ("publish_per_s", "consume_per_s"):
                    if key in r:
                        rows.append(_row("broker", f"{name}.{key}", r[key], "msg/s", size_bytes=size, n=n))
    return rows


def _chat(client: Any, model: str, max_tokens: int) -> int:
    """One 100-token completion (ignore_eos so every request decodes the same length); returns tokens."""
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe your favourite city in detail."}],
        max_tokens=max_tokens,
        temperature=0.8,
        extra_body={"ignore_eos": True},
        timeout=300,
    )
    return r.usage.completion_tokens


def bench_vllm(cfg: GopoConfig, max_tokens: int = 100, repeats: int = 3) -> list[Row]:
    """Policy-server start time and decode throughput (single stream, 8 concurrent), base model and LoRA adapter."""
    import openai

    from gopo_online.bench_weights import make_random_lora_adapter, single_sync
    from gopo_online.serving.process import server_from_config

    rows: list[Row] = []
    t0 = time.perf_counter()
    server = server_from_config(cfg, "policy").start()
    try:
        rows.append(_row("vllm", "server_ready", time.perf_counter() - t0, "s", lora=cfg.serving.weight_transport))
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=300, max_retries=0)
        models = [("base", cfg.model.served_name)]
        if cfg.serving.weight_transport == "lora":
            with tempfile.TemporaryDirectory() as tmp:
                adapter = make_random_lora_adapter(Path(server.model_path), Path(tmp) / "a", rank=8)
                single_sync("lora", Path(tmp) / "w", [server.root_url], adapter_name="bench").publish(
                    1, {"policy": adapter}
                )
                models.append(("lora", "bench"))
                rows += _decode_rows(client, models, max_tokens, repeats)
        else:
            rows += _decode_rows(client, models, max_tokens, repeats)
    finally:
        server.stop()
    return rows


def _decode_rows(client: Any, models: list[tuple[str, str]], max_tokens: int, repeats: int) -> list[Row]:
    rows: list[Row] = []
    _chat(client, models[0][1], 8)  # warm-up
    for label, model in models:
        single = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = _chat(client, model, max_tokens)
            single.append(n / (time.perf_counter() - t))
        rows.append(_row("vllm", f"{label}.tok_per_s_single", statistics.median(single), "tok/s", n=repeats))
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            total = sum(pool.map(_chat, [client] * 8, [model] * 8, [max_tokens] * 8))
        rows.append(_row("vllm", f"{label}.tok_per_s_8_concurrent", total / (time.perf_counter() - t), "tok/s"))
    return rows


def bench_push(cfg: GopoConfig) -> list[Row]:
    """Weight push latency on a live server, per transport (median and p90 of 5)."""
    from gopo_online.bench_weights import bench_weight_push
    from gopo_online.models import resolve_model_path

    rows: list[Row] = []
    for r in bench_weight_push(resolve_model_path(cfg.model), transports=("full", "lora"), repeats=5):
        t = r.get("transport", "?")
        for key, value in r.items():
            if isinstance(value, int | float) and key != "repeats":
                rows.append(_row("push", f"{t}.{key}", value, "s"))
    return rows
