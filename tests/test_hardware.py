"""dtype and thread counts from the CPU's flags and core count (pure functions, both kinds of CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gopo_online import hardware
from gopo_online.config import GopoConfig, load_config
from gopo_online.hardware import choose_dtype, has_native_bf16, parse_flags, plan_threads
from gopo_online.serving.process import VLLMServer

# /proc/cpuinfo excerpts. The AVX-512 box (this CI box: AMD EPYC Zen 4) and an AVX2-only AMD EPYC (Zen 2/3):
# the second has avx2 but no avx512*, no bf16 instruction.
EPYC_AVX512_BF16 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
    "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512ifma "
    "avx512cd sha_ni avx512bw avx512vl avx512_bf16 clzero avx512vbmi avx512_vbmi2 avx512_vnni\n"
    "bugs\t\t: sysret_ss_attrs\n"
)
EPYC_AVX2_ONLY = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7R13 Processor\n"
    "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni clzero rdpid\n"
)
SAPPHIRE_RAPIDS_AMX = "flags\t\t: fpu sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n"


def test_parse_flags_reads_the_flags_line_of_both_cpus():
    assert {"avx2", "avx512_bf16"} <= parse_flags(EPYC_AVX512_BF16)
    flags = parse_flags(EPYC_AVX2_ONLY)
    assert "avx2" in flags and not any(f.startswith("avx512") for f in flags)
    assert parse_flags("model name: no flags line here\n") == frozenset()
    assert "asimd" in parse_flags("Features\t: fp asimd evtstrm aes\n")  # ARM kernels


def test_auto_dtype_is_bf16_only_with_native_bf16():
    assert choose_dtype("auto", parse_flags(EPYC_AVX512_BF16)) == "bfloat16"
    assert choose_dtype("auto", parse_flags(SAPPHIRE_RAPIDS_AMX)) == "bfloat16"
    assert choose_dtype("auto", parse_flags(EPYC_AVX2_ONLY)) == "float32"
    assert choose_dtype("auto", "avx2 avx512f avx512bw") == "float32"  # AVX-512 without bf16 still emulates it
    assert choose_dtype("auto", "") == "float32"  # unknown CPU: the safe choice
    assert choose_dtype("auto", "", device="gpu") == "bfloat16"
    assert has_native_bf16("sse2 amx_bf16") and not has_native_bf16(["avx2"])


def test_explicit_dtype_is_kept_and_bad_values_are_named():
    assert choose_dtype("bfloat16", parse_flags(EPYC_AVX2_ONLY)) == "bfloat16"
    assert choose_dtype("float32", parse_flags(EPYC_AVX512_BF16)) == "float32"
    with pytest.raises(ValueError, match="model.dtype .*'fp8'"):
        choose_dtype("fp8", "")
    with pytest.raises(ValueError, match="device"):
        choose_dtype("auto", "", device="auto")


def test_thread_plan_from_core_count():
    for cores in (1, 2):
        p = plan_threads(cores)
        assert (p.server, p.learner, p.worker) == (1, 1, 1)
    assert (plan_threads(4).server, plan_threads(4).learner) == (2, 1)
    p16 = plan_threads(16)
    assert (p16.server, p16.learner) == (8, 7)
    assert p16.server + p16.learner + 1 <= 16  # one core left for workers/broker/controller
    assert plan_threads(16, servers=2).server == 4
    for cores in range(1, 129):
        p = plan_threads(cores)
        assert p.server >= 1 and p.learner >= 1 and (cores <= 2 or p.server + p.learner <= cores - 1)
    with pytest.raises(ValueError, match="cores"):
        plan_threads(0)


def test_default_config_is_auto_and_resolves_per_cpu(monkeypatch):
    cfg = load_config()
    assert cfg.model.dtype == "auto" and GopoConfig().model.dtype == "auto"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: parse_flags(EPYC_AVX2_ONLY))
    assert cfg.model.resolved_dtype == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: parse_flags(EPYC_AVX512_BF16))
    assert cfg.model.resolved_dtype == "bfloat16"


def test_server_command_passes_the_resolved_dtype_and_threads(monkeypatch):
    # Old code passed the config's "bfloat16" straight to vLLM on every CPU.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: parse_flags(EPYC_AVX2_ONLY))
    cmd = VLLMServer(Path("/m"), port=1, device="cpu", dtype=load_config().model.dtype).command()
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: parse_flags(EPYC_AVX512_BF16))
    cmd = VLLMServer(Path("/m"), port=1, device="cpu").command()
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    env = VLLMServer(Path("/m"), port=1, device="cpu", omp_threads=3).environment()
    assert env["OMP_NUM_THREADS"] == "3"


def test_config_thread_overrides_win(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 16)
    assert hardware.resolve_threads(None, "server") == 8 and hardware.resolve_threads(None, "learner") == 7
    assert hardware.resolve_threads(2, "learner") == 2
    cfg = load_config(overrides=["model.server_threads=3"])
    assert cfg.model.server_threads == 3
    with pytest.raises(Exception, match="server_threads"):
        load_config(overrides=["model.server_threads=0"])


def test_this_machine_reads():
    assert hardware.cpu_cores() >= 1
    assert isinstance(hardware.cpu_flags(), frozenset)


def test_in_flight_is_derived_from_workers_and_checked():
    assert load_config().workers.in_flight_limit == 4  # default: 1 worker x concurrency 4 (was 8: 4 waited)
    cfg = load_config(overrides=["workers.count=2", "workers.concurrency=3"])
    assert cfg.workers.max_in_flight is None and cfg.workers.in_flight_limit == 6
    assert load_config(overrides=["workers.count=2", "workers.max_in_flight=8"]).workers.in_flight_limit == 8
    for bad, why in (("8", "wait in the queue"), ("2", "idle")):
        with pytest.raises(Exception, match=f"max_in_flight = {bad} disagrees.*{why}"):
            load_config(overrides=["workers.count=1", "workers.concurrency=4", f"workers.max_in_flight={bad}"])
    # workers started elsewhere: the number is their total concurrency, stated once
    cluster = load_config(overrides=["workers.count=0", "workers.concurrency=16", "workers.max_in_flight=64"])
    assert cluster.workers.in_flight_limit == 64
