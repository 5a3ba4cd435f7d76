"""vLLM engines as Ray actors: started once per run, kept for every shard, one per GPU (or per
tensor-parallel group), or one on the CPU build of vLLM.

``VLLMEngine`` is a plain class (usable without Ray, e.g. in a notebook); ``EnginePool`` starts
``replicas`` of it as Ray actors and routes each shard to the one with the fewest requests in
flight. A request that fails becomes a row with an ``error`` instead of failing the batch (the
batch is retried row by row first).

Continuous batching: the actors are threaded, so an engine takes many shards at once (one
``generate`` call each), and its ``EngineLoop`` feeds all their requests into one running vLLM
batch (up to ``engine.max_in_flight``, vLLM's ``max_num_seqs``); a shard's call returns as soon as
its own requests finish, and the requests of the next shard are already running. The sampler
(``flows/sampling.py``) keeps about ``EnginePool.capacity()`` requests in flight. The same code on a
GPU, where vLLM's engine core runs in its own process and ``step`` reaches it there.

Placement: the pool reserves one placement-group bundle per replica,
``{"CPU": cpus_per_replica, "GPU": gpus_per_replica * tensor_parallel_size}``, before it starts an
actor. A bundle always lies on one node, so a tensor-parallel group's GPUs are on one node (what
STRICT_PACK would give one group); the group's strategy is PACK, so replicas fill a node first but
may spread over nodes. CPU stages (verify, dedup signatures) are plain Ray tasks and get what the
bundles leave. A cluster that cannot hold the bundles is an error that names them.

Faults: an engine actor whose process dies (OOM killer, a lost node, SIGKILL) is restarted by Ray
(``max_restarts``); the pool waits for it and resubmits the batch (``max_task_retries=0``: the
pool, not Ray, decides what is retried). A batch that keeps killing its engine is split in halves,
down to single requests, and a request that still kills it becomes an error result (a
``generation_error`` reject), not a failed run.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from distillery.hardware import cpu_engine_env, resolve_dtype
from distillery.logs import run_logger
from schemas.recipe import EngineConfig, GenerationConfig

# vLLM and the tokenizer must never reach for a model hub at run time.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

MAX_CALLS_PER_ENGINE = 64  # shards one engine actor takes at once (each a ``generate`` call)
DEFAULT_MAX_IN_FLIGHT = 256  # vLLM's batch on CPUs and most GPUs, until the engines say theirs
MAX_RESTARTS = 3  # Ray restarts a dead engine actor this often...
MAX_REPLACEMENTS = 3  # ...then the pool starts a new one in the same bundle, this often per replica
BATCH_ATTEMPTS = 2  # a whole batch is sent this often before it is split
_PING = [{"role": "user", "content": "ping"}]


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class PlacementError(ValueError):
    """The cluster cannot hold the engines' placement group (the recipe's ``engine`` asks for
    more than there is). A ``ValueError``: the CLI reports it and exits 1."""


class EngineLost(RuntimeError):
    """An engine actor died more often than it may be restarted and replaced."""


def _actor_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


STOPPED = "the engine stopped the request:"  # vLLM refused this request itself: sending it again would not help


def error_result(message: str) -> dict[str, Any]:
    """A request that produced no completion: ``samples_from_results`` makes it a reject."""
    return {"completion": None, "finish_reason": "error", "num_tokens": 0, "prompt_tokens": 0, "error": message, "prompt": None}


def placement_bundles(engine: EngineConfig) -> list[dict[str, float]]:
    """One bundle per engine replica: its CPUs and its GPUs (``gpus_per_replica`` per
    tensor-parallel rank); zero amounts are left out (Ray rejects a bundle of zeros)."""
    gpus = engine.gpus_per_replica * engine.tensor_parallel_size
    bundle = {k: float(v) for k, v in (("CPU", engine.cpus_per_replica), ("GPU", gpus)) if v}
    return [dict(bundle) for _ in range(engine.replicas)] if bundle else []


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def _fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether ``bundles`` fit the nodes' total resources (first fit, largest bundle first)."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    max_tokens: int
    # Constrained decoding: canonical JSON in vLLM's names ({"json": schema} / {"regex": ...} /
    # {"choice": [...]}, schemas.recipe.StructuredOutput.spec); None: free text.
    structured: str | None = None

    @staticmethod
    def from_config(cfg: GenerationConfig) -> SamplingSettings:
        structured = cfg.structured_output.spec() if cfg.structured_output is not None else None
        return SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens, structured)

    def vllm_params(self, seed: int):
        """vLLM's ``SamplingParams`` for one request."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(**json.loads(self.structured)) if self.structured else None
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, seed=seed, structured_outputs=structured)


def resolve_engine_dtype(engine: EngineConfig, model_path: str | None = None, flags=None) -> tuple[str, str]:
    """``(dtype, why)`` for an engine: ``engine.dtype``, with ``auto`` resolved for the device
    (:func:`distillery.hardware.resolve_dtype`: float32 on a CPU without native bfloat16)."""
    return resolve_dtype(engine.dtype, gpu=engine.gpus_per_replica > 0, model_dir=model_path, flags=flags)


def with_resolved_dtype(engine: EngineConfig, model_path: str | None = None) -> tuple[EngineConfig, str]:
    """The engine settings with ``dtype`` resolved (what the engines, the generation cache and the
    manifest use), and why that dtype; the recipe itself keeps what the user wrote."""
    dtype, why = resolve_engine_dtype(engine, model_path)
    return engine.model_copy(update={"dtype": dtype}), why


# The CPU engine's core runs in the engine's own process, not in two more (engine core and
# worker): on 2 cores it starts in about 4 s instead of 20 and generates about 1.4x faster (no
# busy-polling engine-core process beside the model's threads; bench/cpu_engine.py measures
# both). A user's VLLM_ENABLE_V1_MULTIPROCESSING wins.
_USER_MULTIPROCESSING = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def _llvmlite_safe_for_vllm() -> bool:
    """Whether vLLM can start its engine core in this process next to llvmlite (numba, which
    ``distillery.minhash`` uses). vLLM 0.32's kernel rebinding (``_rebind_kernels`` in
    ``vllm/triton_utils/dispatcher.py``) reads ``vars()`` of every attribute of every loaded
    module; llvmlite's ``binding.ffi.lib`` answers any attribute name, ``__dict__`` included,
    with a C-function wrapper, and the scan fails on it (``'_lib_fn_wrapper' object has no
    attribute 'get'``). Its table of answers is given an empty ``__dict__`` (llvmlite never asks
    for that name); where that table is not there (another llvmlite), ``False``: the engine core
    then runs in its own process, as vLLM's default does."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    if ffi is None:
        return True
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if not isinstance(table, dict):
        return False
    table.setdefault("__dict__", {})
    return True


def apply_cpu_settings(engine: EngineConfig) -> None:
    """The CPU build's settings, in this process's environment before vLLM starts: its KV cache
    space, its threads (``distillery.hardware.cpu_engine_env``) and where its engine core runs
    (``_USER_MULTIPROCESSING`` above)."""
    if engine.gpus_per_replica > 0:
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(engine.kv_cache_gib))))
    os.environ.update(cpu_engine_env(engine.replicas))
    if _USER_MULTIPROCESSING is None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if _llvmlite_safe_for_vllm() else "1"


class _OwnsEngineCore:
    """Closes the vLLM engine-core process of ``self.llm`` (``close()`` or ``with``)."""

    llm: Any

    def close(self) -> None:
        """Stop the engine-core process now. Without this a non-daemon child outlives the object,
        and the interpreter's exit waits on it forever (multiprocessing joins its children)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown(timeout=30)  # its own teardown takes ~5 s on CPU
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EngineLoop:
    """The one thread that drives a vLLM engine: requests from any number of callers go in as they
    come (``submit``), the engine steps while any is unfinished, and each request's future is
    resolved as soon as that request finishes, so the engine's batch is refilled from whoever is
    waiting instead of draining to the slowest request of one call.

    Only this thread touches the engine (vLLM's ``LLMEngine`` is not thread-safe). A request the
    engine refuses (``add_request`` raises, e.g. a prompt longer than ``max_model_len``) fails alone;
    a step that raises fails every request in flight, and a dead engine core is started again
    (``restart``) before the loop goes on."""

    def __init__(self, llm, restart) -> None:
        import queue
        import threading

        self.llm, self._restart = llm, restart
        self._inbox: queue.Queue = queue.Queue()
        self._futures: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.submitted = self.done = self.tokens = 0  # requests taken, requests finished, output tokens
        self.peak_in_flight = 0  # the most requests the engine held at once
        self._next_id = 0
        self._thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], params: list) -> list:
        from concurrent.futures import Future

        futures = [Future() for _ in prompts]
        with self._lock:
            self.submitted += len(prompts)
        self._inbox.put((prompts, params, futures))
        return futures

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "submitted": self.submitted, "done": self.done, "tokens": self.tokens,
                "in_flight": len(self._futures), "peak_in_flight": self.peak_in_flight,
            }

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _take_new(self, block: bool) -> bool:
        """Add what callers sent to the engine; ``False`` once ``stop`` was called."""
        import queue

        from vllm.sampling_params import RequestOutputKind

        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            block = False
            for prompt, param, future in zip(*item, strict=True):
                self._next_id += 1
                request_id = f"distillery-{self._next_id}"  # finished outputs carry this id
                param.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it is done
                try:
                    self.llm.llm_engine.add_request(request_id, prompt, param)
                except Exception as err:  # refused alone: the others go on
                    future.set_exception(err)
                    continue
                with self._lock:
                    self._futures[request_id] = future
                    self.peak_in_flight = max(self.peak_in_flight, len(self._futures))

    def _run(self) -> None:
        while self._take_new(block=not self._futures):
            if not self._futures:
                continue
            try:
                outputs = self.llm.llm_engine.step()
            except Exception as err:  # nothing in flight can finish now: fail them, start again if dead
                self._fail_all(err)
                continue
            for out in outputs:
                if not out.finished:
                    continue
                with self._lock:
                    future = self._futures.pop(out.request_id, None)
                    self.done += 1
                    self.tokens += len(out.outputs[0].token_ids)
                if future is not None:
                    future.set_result(out)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            futures, self._futures = self._futures, {}
        try:
            self.llm.llm_engine.abort_request(list(futures))
        except Exception:  # a dead engine core aborts nothing; it is started again below
            pass
        if type(err).__name__ == "EngineDeadError":
            self.llm = self._restart()
        for future in futures.values():
            future.set_exception(err)


class VLLMEngine(_OwnsEngineCore):
    """One vLLM engine; ``generate`` turns chat requests into completions.

    Many ``generate`` calls may run at once (the pool's actors are threaded): with
    ``engine.continuous_batching`` (the default) their requests share the engine's batch through one
    :class:`EngineLoop`; without it the calls take turns, one batch at a time."""

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0) -> None:
        import threading

        os.environ.update(ENGINE_ENV)
        if _in_ray_worker():
            # vLLM logs to stdout; in a Ray worker that reaches the driver's stdout, whose last
            # line must stay the published URI. Send the engine's output to stderr instead.
            os.dup2(2, 1)
        apply_cpu_settings(engine)
        from vllm import LLM

        self.dtype, _ = resolve_engine_dtype(engine, model_path)
        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": self.dtype,
            "max_model_len": engine.max_model_len,
            "seed": seed,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "enforce_eager": engine.gpus_per_replica == 0 if engine.enforce_eager is None else engine.enforce_eager,
        }
        if engine.max_in_flight is not None:
            kwargs["max_num_seqs"] = engine.max_in_flight
        if engine.gpus_per_replica > 0:
            kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
            if engine.tensor_parallel_size > 1:
                # The actor holds its whole tensor-parallel group (one bundle, one node), so the
                # ranks are local processes. Inside a placement group vLLM would otherwise pick
                # its Ray executor, which wants one bundle per GPU and refuses ours.
                kwargs["distributed_executor_backend"] = "mp"
        else:
            # vLLM 0.32 CPU: a per-request seed plus a prompt split across scheduler steps
            # (chunked prefill) kills the engine ("CPU Generator does not use offset"). Whole
            # prompts per step avoid the split; per-sample seeds are what make runs reproducible.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(engine.max_model_len, 4096)
        self._start = lambda: LLM(**kwargs)
        self.llm = self._start()
        self.tokenizer = self.llm.get_tokenizer()
        self.max_in_flight = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        # False: the calls take turns, one batch at a time (may be changed between calls)
        self.continuous_batching = engine.continuous_batching
        self._turns = threading.Lock()
        self.loop = EngineLoop(self.llm, self._restarted)

    def _restarted(self):
        """A new engine after its core died (called by the loop's thread)."""
        try:
            self.close_core()
        except Exception:  # it is dead already; what matters is the new one
            pass
        self.llm = self._start()
        return self.llm

    def close_core(self) -> None:
        _OwnsEngineCore.close(self)

    def close(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
            self.loop = None
        self.close_core()

    def capacity(self) -> int:
        """Requests this engine runs at once: what a caller should keep in flight to fill it."""
        return self.max_in_flight

    def progress(self) -> dict[str, int]:
        """Requests taken and finished and output tokens so far (answers while ``generate`` runs)."""
        return self.loop.stats()

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, prompts: list[str], seeds: list[int], sampling: SamplingSettings) -> list[dict[str, Any]]:
        """One result per prompt; a request that fails is an error result, the others come back."""
        params = [sampling.vllm_params(s) for s in seeds]
        results = []
        for future in self.loop.submit(prompts, params):
            try:
                out = future.result()
            except Exception as err:
                results.append(error_result(f"{type(err).__name__}: {err}"))
                continue
            if out.outputs[0].finish_reason in ("abort", "error"):
                # vLLM finishes a request it could not run with no text, e.g. a structured-output
                # grammar that did not compile: an error, never an empty completion
                why = " (its structured-output constraint did not compile: see the engine's log)" if sampling.structured else ""
                results.append(error_result(f"{STOPPED} finish_reason {out.outputs[0].finish_reason}{why}"))
                continue
            results.append({
                "completion": out.outputs[0].text,
                "finish_reason": out.outputs[0].finish_reason or "unknown",
                "num_tokens": len(out.outputs[0].token_ids),
                "prompt_tokens": len(out.prompt_token_ids or []),
                "error": None,
            })
        return results

    def generate(self, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        """``requests``: dicts with ``messages``, ``sampling_seed`` and optionally ``response_prefix``;
        one result dict per request, in order."""
        # A ``response_prefix`` starts the assistant's turn (e.g. "Score:"), and the model goes on from it.
        prompts = [self.render(r["messages"]) + r.get("response_prefix", "") for r in requests]
        seeds = [r["sampling_seed"] for r in requests]
        if not self.continuous_batching:
            with self._turns:
                results = self._generate(prompts, seeds, sampling)
        else:
            results = self._generate(prompts, seeds, sampling)
        # A step that failed failed every request in flight, not only the one that made it fail:
        # those are sent again one by one, and only a request that fails alone stays an error.
        for i, result in enumerate(results):
            if result["error"] is not None and len(requests) > 1 and not result["error"].startswith(STOPPED):
                results[i] = self._generate([prompts[i]], [seeds[i]], sampling)[0]
        for prompt, result in zip(prompts, results, strict=True):
            result["prompt"] = prompt
        return results


class PoolingRewardModel(_OwnsEngineCore):
    """A sequence-classification reward model served by vLLM's pooling runner (``LLM.classify``).

    The score of a (prompt, completion) pair is the probability of the last label: the sigmoid
    of a single-logit head, or P(label 1) of a two-label (incorrect/correct) head.
    """

    def __init__(self, model_path: str, engine: EngineConfig) -> None:
        os.environ.update(ENGINE_ENV)
        apply_cpu_settings(engine)  # the KV cache space: without it the CPU backend reserves 92% of RAM
        from vllm import LLM

        self.dtype, _ = resolve_engine_dtype(engine, model_path)
        self.llm = LLM(
            model=model_path,
            runner="pooling",
            dtype=self.dtype,
            max_model_len=engine.max_model_len,
            enforce_eager=engine.gpus_per_replica == 0 if engine.enforce_eager is None else engine.enforce_eager,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def render(self, prompt: str, completion: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return [float(out.outputs.probs[-1]) for out in self.llm.classify(texts, use_tqdm=False)]


class EnginePool:
    """``replicas`` engines as Ray actors; shard ``i`` goes to actor ``i % replicas``.

    The actors start on the first request (once, whichever shard asks first), so a run whose
    requests all come from the generation cache never starts an engine. Each actor runs in its
    own bundle of one placement group (``placement_bundles``), removed again by ``shutdown``.

    ``placement_timeout_s``: how long to wait for the cluster to make room for the bundles
    (``DISTILLERY_PLACEMENT_TIMEOUT_S``; by default 60 s on a local cluster, 600 s on one named by
    ``RAY_ADDRESS``, whose autoscaler may have to start GPU nodes). A local cluster that could
    never hold them fails at once.
    """

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0, *, placement_timeout_s: float | None = None, engine_cls: type | None = None) -> None:
        import threading

        self.model_path, self.engine, self.seed = model_path, engine, seed
        self.actors: list = []
        self.placement_group = None
        self.started_in: float | None = None  # seconds the engines took to start
        self.actor_failures = 0  # batches that lost their engine (each was resubmitted or split)
        self.replaced: list[int] = []  # per replica: new actors started after Ray's restarts ran out
        default = 600.0 if os.environ.get("RAY_ADDRESS") else 60.0
        self.placement_timeout_s = placement_timeout_s if placement_timeout_s is not None else _seconds("DISTILLERY_PLACEMENT_TIMEOUT_S", default)
        self.restart_timeout_s = _seconds("DISTILLERY_ENGINE_RESTART_TIMEOUT_S", 900.0)
        self._engine_cls = engine_cls or VLLMEngine  # a stand-in only in tests of the fault handling
        self._lock = threading.Lock()
        self._in_flight: list[int] = []  # requests in flight per engine
        self._capacity: int | None = None

    def _reserve(self):
        """The placement group for the engines, ready; ``None`` when they ask for no resources."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundles = placement_bundles(self.engine)
        if not bundles:
            return None
        wanted = f"{len(bundles)} x {{{_describe(bundles[0])}}}"
        e = self.engine
        settings = f"engine.replicas={e.replicas}, engine.cpus_per_replica={e.cpus_per_replica:g}, engine.gpus_per_replica={e.gpus_per_replica:g}, engine.tensor_parallel_size={e.tensor_parallel_size}"
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
        have = f"{len(nodes)} node(s) with {_describe(total)} in all"
        if not os.environ.get("RAY_ADDRESS") and not _fits(bundles, nodes):
            # a local cluster never grows: waiting could not help
            msg = f"the engines need {wanted} (one bundle per replica: {settings}) but this local Ray cluster has {have}; lower the engine settings or set RAY_ADDRESS to a cluster that has them"
            raise PlacementError(msg)
        group = placement_group(bundles, strategy="PACK", name=f"distillery-engines-{os.getpid()}-{id(self)}")
        if not group.wait(timeout_seconds=self.placement_timeout_s):
            remove_placement_group(group)
            free = ray.available_resources()
            available = {k: free.get(k, 0.0) for k in ("CPU", "GPU")}
            msg = (
                f"the engines need {wanted} (one bundle per replica: {settings}); the Ray cluster ({have}, "
                f"{_describe(available)} free now) could not place them within {self.placement_timeout_s:g}s "
                "(set DISTILLERY_PLACEMENT_TIMEOUT_S to wait longer, e.g. for an autoscaler)"
            )
            raise PlacementError(msg)
        return group

    def _new_actor(self, index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine = self.engine
        options: dict[str, Any] = {
            "num_cpus": engine.cpus_per_replica,
            "num_gpus": engine.gpus_per_replica * engine.tensor_parallel_size,
            "max_restarts": MAX_RESTARTS,
            "max_task_retries": 0,  # a batch in flight when the actor died is resubmitted by ``generate``
            # threaded: the shards in flight are generated at once, in one batch (VLLMEngine's loop)
            "max_concurrency": MAX_CALLS_PER_ENGINE,
            "runtime_env": {"env_vars": ENGINE_ENV},
        }
        if self.placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            )
        return ray.remote(**options)(self._engine_cls).remote(self.model_path, engine, self.seed)

    def start(self) -> list:
        import time

        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            if not self.actors:
                started = time.perf_counter()
                self.placement_group = self._reserve()
                try:
                    actors = [self._new_actor(i) for i in range(self.engine.replicas)]
                    # Surface start-up failures (bad model folder, out of memory) here, once, with the cause.
                    ray.get([a.render.remote(_PING) for a in actors])
                except BaseException:
                    if self.placement_group is not None:
                        remove_placement_group(self.placement_group)
                        self.placement_group = None
                    raise
                self.actors = actors
                self.replaced = [0] * len(actors)
                self._in_flight = [0] * len(actors)
                try:
                    self._capacity = sum(ray.get([a.capacity.remote() for a in actors]))
                except Exception:  # an engine class without ``capacity`` (a test's stand-in)
                    self._capacity = None
                self.started_in = time.perf_counter() - started
        return self.actors

    def generate(self, shard_index: int, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        """Results of ``requests``, in order, from the engine with the fewest requests in flight
        (ties: engine ``shard_index % replicas``); many shards may be in flight at once."""
        if not requests:
            return []
        actors = self.start()
        with self._lock:
            n = len(actors)
            index = min(range(n), key=lambda i: (self._in_flight[i], (i - shard_index) % n))
            self._in_flight[index] += len(requests)
        try:
            return self._generate(index, requests, sampling, BATCH_ATTEMPTS)
        finally:
            with self._lock:
                self._in_flight[index] -= len(requests)

    def capacity(self) -> int:
        """Requests the engines run at once, all replicas together: what the sampler keeps in
        flight. Before the engines start: ``engine.max_in_flight`` or vLLM's usual 256 each."""
        if self._capacity is None:
            return self.engine.replicas * (self.engine.max_in_flight or DEFAULT_MAX_IN_FLIGHT)
        return self._capacity

    def progress(self) -> dict[str, int]:
        """The engines' request and token counts so far, summed (``VLLMEngine.progress``); an
        engine that does not answer within 5 s (restarting) adds nothing this time."""
        import ray

        total: Counter = Counter()
        with self._lock:
            actors = list(self.actors)
        for actor in actors:
            try:
                total.update(ray.get(actor.progress.remote(), timeout=5))
            except Exception:
                continue
        return dict(total)

    def _generate(self, index: int, requests: list[dict[str, Any]], sampling: SamplingSettings, attempts: int) -> list[dict[str, Any]]:
        """Send ``requests`` to engine ``index`` up to ``attempts`` times while its actor dies;
        then in halves (one attempt each), and a single request that still kills it is an error."""
        import ray

        error: BaseException | None = None
        for attempt in range(1, attempts + 1):
            actor = self.actors[index]
            try:
                return ray.get(actor.generate.remote(requests, sampling))
            except _actor_errors() as err:
                error = err
                with self._lock:
                    self.actor_failures += 1
                run_logger(__name__).warning(
                    "engine %d died during a batch of %d requests (attempt %d of %d): %s; waiting for it to come back",
                    index, len(requests), attempt, attempts, _first_line(err),
                )
                self._revive(index, actor)
        if len(requests) == 1:
            return [error_result(f"the engine died on this request {attempts} time(s): {type(error).__name__}: {_first_line(error)}")]
        half = len(requests) // 2
        run_logger(__name__).warning("engine %d: splitting a batch of %d requests that keeps killing it", index, len(requests))
        return self._generate(index, requests[:half], sampling, 1) + self._generate(index, requests[half:], sampling, 1)

    def _revive(self, index: int, dead) -> None:
        """Return once engine ``index`` answers again: Ray's restart of ``dead`` or, when its
        restarts are used up, a new actor in the same bundle (``MAX_REPLACEMENTS`` per replica)."""
        import ray

        for _ in range(MAX_REPLACEMENTS + 2):
            with self._lock:
                actor = self.actors[index]
            err = self._wait_for(index, actor)
            if err is None:
                return
            with self._lock:
                if self.actors[index] is not actor:
                    continue  # another shard's thread replaced it already
                if self.replaced[index] >= MAX_REPLACEMENTS:
                    msg = f"engine {index} died more than {(MAX_REPLACEMENTS + 1) * (MAX_RESTARTS + 1) - 1} times; giving up: {_first_line(err)}"
                    raise EngineLost(msg) from err
                self.replaced[index] += 1
                run_logger(__name__).warning("engine %d is gone for good (%s); starting a new actor (%d of %d)", index, _first_line(err), self.replaced[index], MAX_REPLACEMENTS)
                ray.kill(actor)
                self.actors[index] = self._new_actor(index)
        raise EngineLost(f"engine {index} could not be started again")

    def _wait_for(self, index: int, actor) -> BaseException | None:
        """``None`` once ``actor`` answers (a call to a restarting actor waits for it); the
        error when it is dead for good (three calls in a row find it dead)."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + self.restart_timeout_s
        deaths = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                ray.get(actor.render.remote(_PING), timeout=left)
                return None
            except GetTimeoutError:
                break
            except ActorUnavailableError:  # restarting, or its death is not noticed yet
                time.sleep(0.5)
            except _actor_errors() as err:  # a call sent just before Ray noticed the death fails too
                deaths += 1
                if deaths >= 3:
                    return err
                time.sleep(0.5)
        msg = f"engine {index} did not come back within {self.restart_timeout_s:g}s (DISTILLERY_ENGINE_RESTART_TIMEOUT_S)"
        raise EngineLost(msg)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if self.placement_group is not None:
                remove_placement_group(self.placement_group)
                self.placement_group = None


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


class Unreachable(ConnectionError):
    """A service the run needs (a Ray cluster, the store) does not answer; the message says which."""


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """With ``RAY_ADDRESS`` set, check in ``timeout`` seconds that something listens there.

    ``ray.init(address=...)`` on a closed port does not fail: it retries for minutes ("Failed to
    connect to GCS ... within 5 seconds", again and again). So the CLI opens one TCP connection to
    the cluster's address first and stops with :class:`Unreachable`, naming ``RAY_ADDRESS``.
    ``auto`` is resolved like Ray does (the cluster last started on this machine)."""
    import socket

    original = os.environ.get("RAY_ADDRESS", "").strip()
    if not original or original == "local":
        return
    address = original
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception as err:  # no cluster started on this machine
            msg = f"RAY_ADDRESS=auto: no running Ray cluster found on this machine ({err}); start one with `ray start --head`, or unset RAY_ADDRESS to start a local one"
            raise Unreachable(msg) from None
    client = address.startswith("ray://")
    target = address.removeprefix("ray://").rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep:
        host, port = target, "10001" if client else "6379"
    try:
        port_number = int(port)
    except ValueError:
        msg = f"RAY_ADDRESS={original!r}: expected host:port (a Ray cluster's GCS address, e.g. 10.0.0.5:6379) or ray://host:10001"
        raise Unreachable(msg) from None
    advice = "start the cluster (`ray start --head`) or fix RAY_ADDRESS, or unset it to start a local cluster"
    try:
        sock = socket.create_connection((host.strip("[]"), port_number), timeout=timeout)
    except OSError as err:
        why = f"no answer in {timeout:g}s" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        msg = f"RAY_ADDRESS={original}: no Ray cluster reachable at {host}:{port_number} ({why}); {advice}"
        raise Unreachable(msg) from None
    header = b""
    with sock:
        # Ray's GCS (and its client server) speak gRPC: to HTTP/2's connection preface a gRPC
        # server answers with a SETTINGS frame (type 4). Anything else listening there is not Ray.
        try:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:
            pass
    if len(header) < 9 or header[3] != 4:
        msg = f"RAY_ADDRESS={original}: something listens at {host}:{port_number}, but it does not answer like a Ray cluster (no gRPC answer in {timeout:g}s); {advice}"
        raise Unreachable(msg)


def start_ray() -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster (no server to set up)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env = {**ENGINE_ENV, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if address:
        check_ray_address()  # ray.init would retry a dead address for minutes
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        # "local": a new cluster, never one that `ray start` left on this machine (which a bare
        # ray.init() would join): RAY_ADDRESS is the one way to name a cluster.
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env}, configure_logging=False)


def in_shards(generator, requests: list[dict], sampling: SamplingSettings, size: int) -> list[dict]:
    """Results of ``requests``, in order, sent to the engines ``size`` at a time (shard ``i``
    named ``i``), up to ``MAX_CALLS_PER_ENGINE`` shards at once: the engines batch them together."""
    from concurrent.futures import ThreadPoolExecutor

    shards = [requests[start : start + size] for start in range(0, len(requests), size)]
    if len(shards) <= 1:
        return generator.generate(0, shards[0], sampling) if shards else []
    with ThreadPoolExecutor(min(len(shards), MAX_CALLS_PER_ENGINE), thread_name_prefix="in-shards") as pool:
        parts = list(pool.map(lambda k: generator.generate(k, shards[k], sampling), range(len(shards))))
    return [r for part in parts for r in part]
