"""Synthesize: N chain-of-thought samples per problem.

The stage is two plain functions around whatever generates text: ``build_requests`` turns
seeds into chat requests (the prompt template rendered in Jinja2's sandbox, one request per sample,
each with its own sampling seed), and ``samples_from_results`` turns the engine's results back
into rows with their lineage. The flow puts a vLLM engine (a Ray actor) between them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from schemas.recipe import GenerationConfig
from schemas.templates import sandboxed_environment

_JINJA = sandboxed_environment(keep_trailing_newline=True)  # recipe templates are untrusted: Jinja2's sandbox


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from ``parts`` (the first 4 bytes of the sha256 of them joined by ``:``):
    the same on every rerun, shard, worker and machine. Every request's sampling seed comes from
    here, each stage naming its own parts (``run_seed, seed_id, "syllabus"``, ...)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def sampling_seed(run_seed: int, seed_id: str, sample_index: int) -> int:
    """A per-sample seed that depends only on the run seed, the problem and the sample index,
    so a sample is the same whichever shard, worker or retry produced it."""
    return derived_seed(run_seed, seed_id, sample_index)


def sample_id(seed_id: str, sample_index: int) -> str:
    return f"{seed_id}-s{sample_index:03d}"


def build_messages(question: str, cfg: GenerationConfig) -> list[dict[str, str]]:
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": _JINJA.from_string(cfg.prompt_template).render(question=question)})
    return messages


def build_requests(seeds: pl.DataFrame, cfg: GenerationConfig, *, first_index: int = 0, count: int | None = None) -> list[dict[str, Any]]:
    """One request per (problem, sample index), in seed order: sample indices ``first_index`` to
    ``first_index + count - 1`` (``count`` defaults to ``samples_per_problem``). Adaptive rounds
    go on from where the last round stopped, so every sample has its own index and seed."""
    count = cfg.samples_per_problem if count is None else count
    requests = []
    for seed in seeds.iter_rows(named=True):
        messages = build_messages(seed["question"], cfg)
        for k in range(first_index, first_index + count):
            requests.append(
                {
                    "seed_id": seed["seed_id"],
                    "sample_index": k,
                    "messages": messages,
                    "sampling_seed": sampling_seed(cfg.seed, seed["seed_id"], k),
                }
            )
    return requests


def samples_from_results(
    seeds: pl.DataFrame,
    requests: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    samples_per_problem: int,
    lineage: dict[str, str],
    rows_in: int | None = None,
    carry: tuple[str, ...] = (),
) -> StageResult:
    """Join results to their seeds; a request that failed or came back empty is a reject.
    ``rows_in``: what the requests were made from (default: the seeds), each asked
    ``samples_per_problem`` times. A request's own ``sample_id`` (else one from its seed and
    index) names its row, and its ``carry`` fields are copied onto it."""
    if len(requests) != len(results):
        msg = f"engine returned {len(results)} results for {len(requests)} requests"
        raise RuntimeError(msg)
    by_seed = {s["seed_id"]: s for s in seeds.iter_rows(named=True)}
    rows = []
    for request, result in zip(requests, results, strict=True):
        seed = by_seed[request["seed_id"]]
        rows.append(
            {
                "sample_id": request.get("sample_id") or sample_id(seed["seed_id"], request["sample_index"]),
                "seed_id": seed["seed_id"],
                "sample_index": request["sample_index"],
                "question": seed["question"],
                "reference_answer": seed["reference_answer"],
                "source": seed["source"],
                "prompt": result.get("prompt"),
                "completion": result.get("completion"),
                "finish_reason": result.get("finish_reason"),
                "num_tokens": result.get("num_tokens", 0),
                "sampling_seed": request["sampling_seed"],
                "error": result.get("error"),
                **lineage,
                **{k: request[k] for k in carry},
            }
        )
    frame = pl.DataFrame(rows, schema_overrides={"num_tokens": pl.Int64, "sample_index": pl.Int64, "sampling_seed": pl.Int64, "error": pl.Utf8, "completion": pl.Utf8, "reference_answer": pl.Utf8})
    result = StageResult.split(
        "synthesize",
        frame,
        [
            ("generation_error", pl.col("error").is_not_null()),
            ("empty_completion", pl.col("completion").fill_null("").str.strip_chars() == ""),
        ],
        fanout=samples_per_problem,
        rows_in=seeds.height if rows_in is None else rows_in,
        detail=pl.col("error"),
    )
    result.kept = result.kept.drop("error")
    return result
