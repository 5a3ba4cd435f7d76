"""What the machine under an engine can do: the dtype ``engine.dtype: auto`` resolves to, and the
thread settings of vLLM's CPU backend.

**dtype.** A model folder's weights may be bfloat16 (the embedded model's are), but a CPU without
native bfloat16 instructions emulates every bfloat16 matrix product. Measured on an AVX2 machine
without AVX-512: 16.2 output tokens/s in bfloat16 against 47.6 in float32 for the same requests
(``make bench-cpu`` measures it on yours). So ``auto`` means:

- on a GPU: the model's own dtype (its ``config.json``), what vLLM's ``auto`` would pick;
- on a CPU with native bfloat16 (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``): bfloat16;
- on any other CPU: float32.

The flags come from ``/proc/cpuinfo`` (``cpu_flags``); tests inject them.

**Threads.** vLLM's CPU backend binds its worker's OpenMP threads to cores itself
(``VLLM_CPU_OMP_THREADS_BIND=auto``) and by default keeps one core per worker free for the
engine-core (scheduler) process. On a 2-core machine that leaves the model one thread; inside a
Ray actor ``OMP_NUM_THREADS`` is the actor's ``num_cpus`` (1) as well. ``cpu_engine_env`` gives
the settings ``make bench-cpu`` found fastest (see the comment there): every core, unbound.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm (Features: bf16)


def cpu_flags(cpuinfo: Path | str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (Arm) line of ``/proc/cpuinfo``.
    Empty where the file cannot be read (then nothing native is assumed)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: Iterable[str]) -> str | None:
    """The flag that gives this CPU native bfloat16 arithmetic, or ``None``."""
    found = set(flags)
    return next((f for f in BF16_FLAGS if f in found), None)


def model_dtype(model_dir: Path | str | None) -> str | None:
    """The dtype a Hugging Face model folder declares (``dtype`` or the older ``torch_dtype``)."""
    if model_dir is None:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


def resolve_dtype(requested: str, *, gpu: bool, model_dir: Path | str | None = None, flags: Iterable[str] | None = None) -> tuple[str, str]:
    """``(dtype, why)``: the dtype an engine runs with, and a phrase saying why (for the log).

    ``requested`` other than ``auto`` is kept as it is. ``flags`` are the CPU's feature flags
    (default: this machine's, from ``/proc/cpuinfo``)."""
    if requested != "auto":
        return requested, "set in the recipe (engine.dtype)"
    if gpu:
        own = model_dtype(model_dir)
        return (own, "the model's own dtype (config.json), on a GPU") if own else ("auto", "vLLM's choice, on a GPU")
    flag = native_bf16(cpu_flags() if flags is None else flags)
    if flag:
        return "bfloat16", f"this CPU has native bfloat16 ({flag})"
    return "float32", "this CPU has no native bfloat16 (no avx512_bf16/amx_bf16/bf16 flag): bfloat16 would be emulated"


def cpu_threads(replicas: int = 1) -> int:
    """OpenMP threads for one CPU engine: ``DISTILLERY_CPU_THREADS`` if set, else this process's
    cores (its CPU affinity) shared by the ``replicas`` engines of the run."""
    value = os.environ.get("DISTILLERY_CPU_THREADS", "").strip()
    if value:
        return max(1, int(value))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, replicas))


def cpu_engine_env(replicas: int = 1) -> dict[str, str]:
    """Environment for a vLLM engine on the CPU build: every core the engine may have, unbound.

    What ``make bench-cpu`` measured on 2 cores (bench/results/cpu_engine.json, the README's "CPU
    engine settings"): vLLM's default binding keeps one core for the engine-core process, which
    busy-polls while the model runs, so the model gets one thread (bfloat16 about 185 tokens/s,
    steady). Binding two threads to both cores (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) is fastest on
    an idle machine (about 290) but collapses when anything else runs (65-160: a bound thread
    that shares its core with the polling engine core stalls every barrier). Two unbound threads
    (``VLLM_CPU_OMP_THREADS_BIND=nobind``) let the kernel move them: about 250 in bfloat16 and
    1.4x the one-thread speed in float32, and they hold up under load. So: unbound, all cores.

    ``OMP_NUM_THREADS`` is set, not defaulted: inside a Ray actor Ray has set it to the actor's
    ``num_cpus`` (1). ``DISTILLERY_CPU_THREADS`` overrides the count; a user's own
    ``VLLM_CPU_OMP_THREADS_BIND`` (e.g. explicit core lists) wins over ``nobind``."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "OMP_NUM_THREADS": str(cpu_threads(replicas)),
    }
