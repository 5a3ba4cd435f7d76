"""vLLM engines as Ray actors: started once per run, kept for every shard, one per GPU (or per
tensor-parallel group), or one on the CPU build of vLLM.

``VLLMEngine`` is a plain class (usable without Ray, e.g. in a notebook); ``EnginePool`` starts
``replicas`` of it as Ray actors and routes each shard to one. A request that fails becomes a
row with an ``error`` instead of failing the batch (the batch is retried row by row first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from schemas.recipe import EngineConfig, GenerationConfig

# vLLM and the tokenizer must never reach for a model hub at run time.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


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

    @staticmethod
    def from_config(cfg: GenerationConfig) -> SamplingSettings:
        return SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens)


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


class VLLMEngine(_OwnsEngineCore):
    """One vLLM engine; ``generate`` turns chat requests into completions."""

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0) -> None:
        os.environ.update(ENGINE_ENV)
        if _in_ray_worker():
            # vLLM logs to stdout; in a Ray worker that reaches the driver's stdout, whose last
            # line must stay the published URI. Send the engine's output to stderr instead.
            os.dup2(2, 1)
        if engine.gpus_per_replica == 0:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(engine.kv_cache_gib))))
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": engine.dtype,
            "max_model_len": engine.max_model_len,
            "seed": seed,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "enforce_eager": engine.gpus_per_replica == 0 if engine.enforce_eager is None else engine.enforce_eager,
        }
        if engine.gpus_per_replica > 0:
            kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        else:
            # vLLM 0.32 CPU: a per-request seed plus a prompt split across scheduler steps
            # (chunked prefill) kills the engine ("CPU Generator does not use offset"). Whole
            # prompts per step avoid the split; per-sample seeds are what make runs reproducible.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(engine.max_model_len, 4096)
        self._start = lambda: LLM(**kwargs)
        self.llm = self._start()
        self.tokenizer = self.llm.get_tokenizer()

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, prompts: list[str], seeds: list[int], sampling: SamplingSettings) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=s)
            for s in seeds
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            {
                "completion": out.outputs[0].text,
                "finish_reason": out.outputs[0].finish_reason or "unknown",
                "num_tokens": len(out.outputs[0].token_ids),
                "prompt_tokens": len(out.prompt_token_ids or []),
                "error": None,
            }
            for out in outputs
        ]

    def generate(self, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        """``requests``: dicts with ``messages``, ``sampling_seed`` and optionally ``response_prefix``;
        one result dict per request, in order."""
        # A ``response_prefix`` starts the assistant's turn (e.g. "Score:"), and the model goes on from it.
        prompts = [self.render(r["messages"]) + r.get("response_prefix", "") for r in requests]
        seeds = [r["sampling_seed"] for r in requests]
        try:
            results = self._generate(prompts, seeds, sampling)
        except Exception as err:  # one bad request must not sink the batch: retry one by one
            if type(err).__name__ == "EngineDeadError":
                self.llm = self._start()  # a dead engine core answers nothing more; start a new one
            results = []
            for prompt, seed in zip(prompts, seeds, strict=True):
                try:
                    results.extend(self._generate([prompt], [seed], sampling))
                except Exception as err:
                    results.append({"completion": None, "finish_reason": "error", "num_tokens": 0, "prompt_tokens": 0, "error": f"{type(err).__name__}: {err}"})
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
        if engine.gpus_per_replica == 0:
            # Without this the CPU backend tries to reserve 92% of RAM for the pooling runner.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(engine.kv_cache_gib))))
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            runner="pooling",
            dtype=engine.dtype,
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
    requests all come from the generation cache never starts an engine.
    """

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0) -> None:
        import threading

        self.model_path, self.engine, self.seed = model_path, engine, seed
        self.actors: list = []
        self.started_in: float | None = None  # seconds the engines took to start
        self._lock = threading.Lock()

    def start(self) -> list:
        import time

        import ray

        with self._lock:
            if not self.actors:
                started = time.perf_counter()
                engine = self.engine
                actor_cls = ray.remote(
                    num_cpus=engine.cpus_per_replica,
                    num_gpus=engine.gpus_per_replica * engine.tensor_parallel_size,
                    max_restarts=1,  # a dead engine comes back once; its shard is retried by the task
                    runtime_env={"env_vars": ENGINE_ENV},
                )(VLLMEngine)
                actors = [actor_cls.remote(self.model_path, engine, self.seed) for _ in range(engine.replicas)]
                # Surface start-up failures (bad model folder, out of memory) here, once, with the cause.
                ray.get([a.render.remote([{"role": "user", "content": "ping"}]) for a in actors])
                self.actors = actors
                self.started_in = time.perf_counter() - started
        return self.actors

    def generate(self, shard_index: int, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        import ray

        if not requests:
            return []
        actors = self.start()
        actor = actors[shard_index % len(actors)]
        return ray.get(actor.generate.remote(requests, sampling))

    def shutdown(self) -> None:
        import ray

        with self._lock:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


def start_ray() -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster (no server to set up)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env = {**ENGINE_ENV, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, configure_logging=False)
