"""Sampling: the problems' chain-of-thought samples, generated on the engines and verified on
Ray workers, shard by shard, each shard handed on as soon as it is verified.

``sample_in_rounds`` runs the rounds (``generation.adaptive``: a problem stays in the next round
until ``target_correct`` of its samples verify or it has used ``max_samples``) and gives every
verified shard to a sink: ``Samples`` (the run's samples, spilled to local disk per *problem
shard*, so the driver holds a few shards, never the run) or ``Verdicts`` (only who was right:
the difficulty strategy's probe), in the order the shards come back.

The engines stay full: shards are submitted while fewer requests are in flight than the engines
batch (``requests_to_keep_in_flight``), and an engine batches the requests of all the shards it
holds (``distillery.engine.EngineLoop``). Progress (requests done of total, output tokens/s, time
left) is reported every 10 s (``distillery.progress``).
"""

from __future__ import annotations

import json
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from prefect import get_run_logger

from distillery.accounting import StageCount, StageResult
from distillery.progress import GenerationProgress
from flows.curation import Rejects
from schemas.recipe import Recipe
from tasks.synthesize import synthesize_shard
from tasks.verify import verify_shard

IN_FLIGHT = 8  # shards in flight for a generator that does not say what fills it
MAX_SHARDS_IN_FLIGHT = 16  # at most (each holds two of the flow's task threads: generate, verify)
VERDICT_SCHEMA = {"seed_id": pl.Utf8, "correct": pl.Boolean}


def verdicts(checked: StageResult) -> pl.DataFrame:
    """``seed_id`` and ``correct`` of every verified sample: those verify kept and those it dropped."""
    frames = [checked.kept.select("seed_id", "correct")] if checked.kept.height else []
    dropped = checked.rejects.filter(pl.col("stage") == "verify")["record"].to_list() if checked.rejects.height else []
    if dropped:
        frames.append(pl.DataFrame([{k: json.loads(r).get(k) for k in VERDICT_SCHEMA} for r in dropped], schema=VERDICT_SCHEMA))
    return pl.concat(frames) if frames else pl.DataFrame(schema=VERDICT_SCHEMA)


@dataclass
class SampleStats:
    """The run's generation statistics, counted shard by shard (the manifest's ``stats``)."""

    generated: int = 0
    with_reference: int = 0
    correct: int = 0
    tokens: int = 0
    problems: set = field(default_factory=set)
    solved: set = field(default_factory=set)
    finish_reasons: Counter = field(default_factory=Counter)

    def add(self, generated: pl.DataFrame, verified: pl.DataFrame) -> None:
        """Correct samples are never dropped by verify, so the kept rows count them."""
        if generated.height:
            self.generated += generated.height
            self.with_reference += generated.filter(pl.col("reference_answer").is_not_null()).height
            self.tokens += int(generated["num_tokens"].sum())
            self.problems.update(generated["seed_id"].to_list())
            self.finish_reasons.update(str(r) for r in generated["finish_reason"].to_list())
        if verified.height:
            right = verified.filter(pl.col("correct").fill_null(False))
            self.correct += right.height
            self.solved.update(right["seed_id"].to_list())

    def as_dict(self, seconds: float) -> dict:
        if not self.generated:
            return {"samples_generated": 0, "samples_with_reference": 0, "samples_correct": 0, "correct_share": None}
        return {
            "samples_generated": self.generated,
            "samples_with_reference": self.with_reference,
            "samples_correct": self.correct,
            "correct_share": round(self.correct / self.with_reference, 4) if self.with_reference else None,
            "problems": len(self.problems),
            "problems_with_a_correct_sample": len(self.solved),
            "finish_reasons": dict(self.finish_reasons.most_common()),
            "mean_completion_tokens": round(self.tokens / self.generated, 1),
            "generation_seconds": round(seconds, 2),
            "generation_samples_per_second": round(self.generated / seconds, 3) if seconds else None,
            "generation_tokens_per_second": round(self.tokens / seconds, 1) if seconds else None,
        }


class Samples:
    """The run's verified samples, spilled per problem shard (``shard_size`` problems, in the
    problems' order) as their generation shards finish, with every sample's verdict; the
    synthesize and verify rejects go to ``rejects``. Read back one problem shard at a time,
    in the problems' order, each problem's samples by ``sample_index``."""

    def __init__(self, folder: Path, problems: pl.DataFrame, shard_size: int, rejects: Rejects) -> None:
        self.folder, self.shard_size, self.rejects = Path(folder), shard_size, rejects
        self.order = pl.DataFrame({"seed_id": problems["seed_id"], "__position": pl.int_range(problems.height, eager=True)})
        self.files: dict[int, list[Path]] = {}
        self.verdict_files: dict[int, list[Path]] = {}
        self.stats = SampleStats()

    def add(self, generated: StageResult, verified: StageResult) -> None:
        self.stats.add(generated.kept, verified.kept)
        self.rejects.add(generated.rejects)
        self.rejects.add(verified.rejects)
        for files, frame in ((self.files, verified.kept), (self.verdict_files, verdicts(verified))):
            if not frame.height:
                continue
            shard = frame.join(self.order, on="seed_id", how="left").with_columns((pl.col("__position") // self.shard_size).alias("__shard"))
            for (k,), part in shard.group_by("__shard", maintain_order=True):
                path = self.folder / f"{'samples' if files is self.files else 'verdicts'}-{k:06d}-{len(files.get(k, [])):04d}.arrow"
                path.parent.mkdir(parents=True, exist_ok=True)
                part.drop("__shard").write_ipc(path)
                files.setdefault(k, []).append(path)

    def shards(self) -> list[int]:
        return sorted(self.files)

    def read(self, k: int) -> pl.DataFrame:
        """Problem shard ``k``'s samples, in the problems' order, then by ``sample_index``."""
        frame = pl.concat([pl.read_ipc(p) for p in self.files[k]], how="diagonal_relaxed")
        return frame.sort(["__position", "sample_index"]).drop("__position")

    def verdicts(self, k: int) -> pl.DataFrame:
        files = self.verdict_files.get(k, [])
        return pl.concat([pl.read_ipc(p).drop("__position") for p in files]) if files else pl.DataFrame(schema=VERDICT_SCHEMA)


class Verdicts:
    """A sink that keeps only who was right (``seed_id``, ``correct`` of every verified sample)."""

    def __init__(self) -> None:
        self.frames: list[pl.DataFrame] = []

    def add(self, generated: StageResult, verified: StageResult) -> None:
        self.frames.append(verdicts(verified))

    def frame(self) -> pl.DataFrame:
        return pl.concat(self.frames) if self.frames else pl.DataFrame(schema=VERDICT_SCHEMA)


@dataclass
class Sampled:
    """What the rounds did: the synthesize and verify counts, and each problem's samples spent."""

    synthesize: StageCount
    verify: StageCount
    spent: dict[str, int]
    rounds: int


@dataclass
class _Shard:
    """Problems whose next ``count`` samples (indices from ``first``) go to the engines together."""

    number: int
    problems: pl.DataFrame
    first: int
    count: int
    round_no: int
    futures: tuple = ()


def requests_to_keep_in_flight(generator, shard_requests: int) -> int:
    """What fills the engines (``capacity()`` of the pool: vLLM's batch, all replicas) plus one
    shard, so that a finished shard's successor is already waiting; a generator that does not
    say (the tests' scripted one) gets ``IN_FLIGHT`` shards."""
    capacity = getattr(generator, "capacity", None)
    filled = capacity() if capacity is not None else None
    return IN_FLIGHT * shard_requests if filled is None else filled + shard_requests


def sample_in_rounds(generator, recipe: Recipe, problems: pl.DataFrame, lineage: dict, sink) -> Sampled:
    """Generate and verify ``samples_per_problem`` at a time; each verified shard goes to
    ``sink.add(generated, verified)`` as it comes back. Problems without a reference answer stop
    after one round (nothing can verify them).

    The engines are kept full: shards are submitted while the requests in flight are fewer than
    the engines batch (``requests_to_keep_in_flight``), and each engine batches the requests of
    every shard it holds. There is no round barrier: with ``generation.adaptive``, the problems of
    a shard that need more samples go back to the engines as the next round's shard as soon as
    that shard is verified, whatever the other shards are doing.

    The synthesize count has the budget as its fanout: ``rows_in`` problems x ``max_samples``,
    and the samples never drawn because a problem stopped early are ``stopped_early``.
    """
    logger = get_run_logger()
    cfg = recipe.generation
    budget = cfg.adaptive.max_samples if cfg.adaptive else cfg.samples_per_problem
    target = cfg.adaptive.target_correct if cfg.adaptive else None
    spent = dict.fromkeys(problems["seed_id"].to_list(), 0)
    correct = dict.fromkeys(spent, 0)
    synth_counts: list[StageCount] = []
    verify_counts: list[StageCount] = []
    first_count = min(cfg.samples_per_problem, budget)
    waiting = deque(
        _Shard(i, problems.slice(start, cfg.shard_size), 0, first_count, 0)
        for i, start in enumerate(range(0, problems.height, cfg.shard_size))
    )
    numbered = len(waiting)
    keep = requests_to_keep_in_flight(generator, cfg.shard_size * cfg.samples_per_problem)
    progress = GenerationProgress(generator, logger, label="generation")
    progress.submitted(sum(s.problems.height * s.count for s in waiting))
    in_flight: list[_Shard] = []
    rounds = 0
    while waiting or in_flight:
        while waiting and (not in_flight or (sum(s.problems.height * s.count for s in in_flight) < keep and len(in_flight) < MAX_SHARDS_IN_FLIGHT)):
            shard = waiting.popleft()
            generated = synthesize_shard.submit(generator, shard.number, shard.problems, cfg, lineage, shard.first, shard.count)
            shard.futures = (generated, verify_shard.submit(shard.number, generated, recipe.verify))
            in_flight.append(shard)
        done, _ = wait([s.futures[1].wrapped_future for s in in_flight], timeout=1.0, return_when=FIRST_COMPLETED)
        progress.tick()
        for shard in [s for s in in_flight if s.futures[1].wrapped_future in done]:
            in_flight.remove(shard)
            generated = _take(shard.futures, sink, synth_counts, verify_counts, correct)
            progress.came_back(shard.problems.height * shard.count, int(generated.kept["num_tokens"].sum()) if generated.kept.height else 0)
            for seed_id in shard.problems["seed_id"].to_list():
                spent[seed_id] += shard.count
            rounds = max(rounds, shard.round_no + 1)
            if target is None:
                continue
            more = [
                s["seed_id"]
                for s in shard.problems.select("seed_id", "reference_answer").iter_rows(named=True)
                if s["reference_answer"] is not None and correct[s["seed_id"]] < target and spent[s["seed_id"]] < budget
            ]
            logger.info("sampling shard %d (round %d): %d problems, %d keep going", shard.number, shard.round_no + 1, shard.problems.height, len(more))
            if more:
                first = shard.first + shard.count
                successor = _Shard(numbered, shard.problems.filter(pl.col("seed_id").is_in(more)), first, min(cfg.samples_per_problem, budget - first), shard.round_no + 1)
                numbered += 1
                progress.submitted(successor.problems.height * successor.count)
                waiting.appendleft(successor)  # before the first round's rest: its problem waits for it
    progress.close()

    drawn = sum(spent.values())
    dropped: Counter = Counter()
    for c in synth_counts:
        dropped.update(c.dropped)
    if budget * problems.height - drawn:
        dropped["stopped_early"] = budget * problems.height - drawn
    kept = sum(c.rows_out for c in synth_counts)
    synth = StageCount("synthesize", problems.height, kept, budget, dict(dropped)).check()
    verify = StageCount.combine(verify_counts) if verify_counts else StageCount("verify", 0, 0)
    return Sampled(synth, verify, spent, rounds)


def _take(futures, sink, synth_counts: list, verify_counts: list, correct: dict) -> StageResult:
    """One shard's results, handed to the sink; nothing of it stays here but its counts."""
    generated, verified = futures[0].result(), futures[1].result()
    synth_counts.append(generated.count)
    verify_counts.append(verified.count)
    if verified.kept.height:  # verify never drops a correct sample, whatever verify.keep says
        for seed_id in verified.kept.filter(pl.col("correct").fill_null(False))["seed_id"].to_list():
            correct[seed_id] += 1
    sink.add(generated, verified)
    return generated
