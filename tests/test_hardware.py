"""``engine.dtype: auto`` on CPUs with and without native bfloat16 (the flag source injected), and
the CPU engine's thread settings."""

from __future__ import annotations

import json

import pytest

from distillery.engine import resolve_engine_dtype, with_resolved_dtype
from distillery.hardware import cpu_engine_env, cpu_flags, native_bf16, resolve_dtype
from schemas.recipe import EngineConfig

# /proc/cpuinfo lines of real CPUs (trimmed): an AVX2 machine without AVX-512 (where bfloat16 ran
# 2.9x slower than float32), an AVX-512 machine with BF16, a Sapphire Rapids with AMX, an Arm core
AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16\n"
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n"
AMX = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm\n"
ARM_NO_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected", "flag"),
    [
        (AVX2_ONLY, "float32", None),
        (AVX512_NO_BF16, "float32", None),
        (AVX512_BF16, "bfloat16", "avx512_bf16"),
        (AMX, "bfloat16", "amx_bf16"),
        (ARM_BF16, "bfloat16", "bf16"),
        (ARM_NO_BF16, "float32", None),
    ],
)
def test_auto_dtype_on_a_cpu_follows_its_bf16_flags(tmp_path, cpuinfo, expected, flag):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    flags = cpu_flags(path)
    assert native_bf16(flags) == flag
    dtype, why = resolve_dtype("auto", gpu=False, flags=flags)
    assert dtype == expected
    assert (flag in why) if flag else ("no native bfloat16" in why)
    # through the engine settings the flows use
    assert resolve_engine_dtype(EngineConfig(dtype="auto"), None, flags=flags)[0] == expected


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert resolve_dtype("auto", gpu=False, flags=cpu_flags(tmp_path / "missing"))[0] == "float32"


def test_a_dtype_the_recipe_names_is_kept():
    assert resolve_dtype("bfloat16", gpu=False, flags=AVX2_ONLY.split())[0] == "bfloat16"
    assert resolve_dtype("float16", gpu=True)[0] == "float16"
    assert resolve_engine_dtype(EngineConfig(dtype="float32"), None, flags={"avx512_bf16"})[0] == "float32"


def test_on_a_gpu_auto_is_the_models_own_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"}))
    assert resolve_dtype("auto", gpu=True, model_dir=tmp_path, flags=set()) == ("float16", "the model's own dtype (config.json), on a GPU")
    gpu = EngineConfig(gpus_per_replica=1)
    assert resolve_engine_dtype(gpu, str(tmp_path), flags=set())[0] == "float16"  # CPU flags do not matter there
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))  # transformers 5 writes `dtype`
    assert resolve_dtype("auto", gpu=True, model_dir=tmp_path)[0] == "bfloat16"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_dtype("auto", gpu=True, model_dir=tmp_path)[0] == "auto"  # vLLM decides


def test_with_resolved_dtype_keeps_the_rest_of_the_engine_settings(tmp_path):
    engine = EngineConfig(dtype="auto", replicas=2, kv_cache_gib=3)
    resolved, why = with_resolved_dtype(engine, None)
    assert resolved.dtype in ("float32", "bfloat16") and why
    assert resolved.model_dump(exclude={"dtype"}) == engine.model_dump(exclude={"dtype"})
    assert engine.dtype == "auto"  # the recipe keeps what the user wrote


def test_the_cpu_engine_gets_every_core_unbound(monkeypatch):
    import os

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("DISTILLERY_CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in an actor with num_cpus=1
    cores = len(os.sched_getaffinity(0))
    assert cpu_engine_env() == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(cores)}
    assert cpu_engine_env(replicas=2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))  # engines share the cores
    assert cpu_engine_env(replicas=64)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("DISTILLERY_CPU_THREADS", "3")
    assert cpu_engine_env()["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # a user's own binding wins
    assert cpu_engine_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_an_engine_process_gets_those_settings_before_vllm_starts(monkeypatch):
    import os

    from distillery.engine import apply_cpu_settings

    for key in ("VLLM_CPU_OMP_THREADS_BIND", "DISTILLERY_CPU_THREADS", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    apply_cpu_settings(EngineConfig(kv_cache_gib=2))
    assert os.environ["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    apply_cpu_settings(EngineConfig(gpus_per_replica=1))  # GPU engines: left alone
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_the_engine_core_stays_in_process_next_to_numba():
    """vLLM's kernel rebinding scans every loaded module's attributes with ``vars()``; llvmlite's
    ``ffi.lib`` (loaded with numba, which dedup uses) broke that scan, so a process that had run
    dedup had to start its engine core in a process of its own. In a fresh interpreter with numba
    loaded, ``apply_cpu_settings`` keeps the core in process and vLLM's own scan goes through."""
    import os
    import subprocess
    import sys

    code = """
import os, numba
from distillery.engine import apply_cpu_settings
from schemas.recipe import EngineConfig
apply_cpu_settings(EngineConfig())
print(os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
from vllm.triton_utils.dispatcher import _rebind_kernels
_rebind_kernels([])  # the scan register_kernels runs when the engine core starts
print("scanned")
"""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "scanned"]
