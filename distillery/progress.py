"""Generation progress: requests done of total, output tokens/s and the time left, while it runs.

``GenerationProgress`` is told what was submitted (``planned``) and asked to ``tick`` often (the
sampler does, between its shards); at most every ``every_s`` seconds (10, or
``DISTILLERY_PROGRESS_EVERY_S``) it reads the engines' own
counts (``progress()`` of the pool, which answers while they generate, so the figures move with
each finished request, not each finished shard) and reports them:

- in a terminal (standard error is a TTY): a progress bar (tqdm), redrawn at each report;
- otherwise: a plain log line, e.g. ``generation: 130/512 requests (25%), 256 in the engines, 241
  output tok/s, about 2m05s left`` (the requests the engines hold now, where they count them);
- in the Prefect UI: a progress artifact (``generation-progress``), created at the first report
  and updated at each one after.

A generator without ``progress()`` (the tests' scripted one) is counted by what came back.
"""

from __future__ import annotations

import logging
import os
import sys
import time


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class GenerationProgress:
    def __init__(self, generator, logger: logging.Logger | logging.LoggerAdapter, *, label: str = "generation", every_s: float | None = None, bar: bool | None = None, artifact: bool = True, clock=time.monotonic) -> None:
        self.generator, self.logger, self.label, self.clock = generator, logger, label, clock
        self.every_s = every_s if every_s is not None else float(os.environ.get("DISTILLERY_PROGRESS_EVERY_S", 10.0))
        self.planned = 0  # requests submitted (or about to be)
        self.returned = 0  # requests whose shard came back (the fallback count)
        self.returned_tokens = 0
        self.started = clock()
        self._last = self.started
        self._base = self._engine_counts() or {}
        self.reports: list[dict] = []  # every report, for the manifest's stats and the tests
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True, leave=True)
        self._artifact = artifact
        self._artifact_id = None

    def _engine_counts(self) -> dict | None:
        progress = getattr(self.generator, "progress", None)
        if progress is None:
            return None
        try:
            return progress()
        except Exception:  # progress is only ever informative
            return None

    def submitted(self, requests: int) -> None:
        self.planned += requests

    def came_back(self, requests: int, tokens: int) -> None:
        self.returned += requests
        self.returned_tokens += tokens

    def snapshot(self) -> dict:
        """Requests done (engine-side finished, or at least what came back), total, tokens/s, ETA."""
        now = self.clock()
        counts = self._engine_counts()
        done, tokens, in_engines = self.returned, self.returned_tokens, None
        if counts is not None:  # the engines count each request as it finishes, the cache's hits too
            done = max(done, counts.get("done", 0) - self._base.get("done", 0))
            tokens = max(tokens, counts.get("tokens", 0) - self._base.get("tokens", 0))
            in_engines = counts.get("in_flight")  # requests the engines hold now (vLLM engines count them)
        done = min(done, self.planned)
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        left = (self.planned - done) / rate if rate > 0 else None
        return {
            "elapsed_s": round(elapsed, 1), "done": done, "total": self.planned, "in_engines": in_engines,
            "tokens_per_s": round(tokens / elapsed, 1), "eta_s": None if left is None else round(left, 1),
        }

    def line(self, snap: dict) -> str:
        share = f" ({100 * snap['done'] / snap['total']:.0f}%)" if snap["total"] else ""
        held = "" if snap.get("in_engines") is None else f", {snap['in_engines']} in the engines"
        eta = "" if snap["eta_s"] is None else f", about {duration(snap['eta_s'])} left"
        return f"{self.label}: {snap['done']}/{snap['total']} requests{share}{held}, {snap['tokens_per_s']:.0f} output tok/s{eta}"

    def tick(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        snap = self.snapshot()
        self.reports.append(snap)
        if self._bar is not None:
            self._bar.total, self._bar.n = snap["total"], snap["done"]
            self._bar.set_postfix_str(f"{snap['tokens_per_s']:.0f} tok/s", refresh=False)
            self._bar.refresh()
        else:
            self.logger.info(self.line(snap))
        if self._artifact:
            self._update_artifact(snap)

    def _update_artifact(self, snap: dict) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:  # outside a flow run there is no UI to show it in
            return
        percent = 100.0 * snap["done"] / snap["total"] if snap["total"] else 0.0
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, key=f"{self.label}-progress", description=self.line(snap))
            else:
                update_progress_artifact(self._artifact_id, percent, description=self.line(snap))
        except Exception as err:  # the UI's figure must never fail the run
            self.logger.debug("progress artifact not updated: %s", err)
            self._artifact = False

    def close(self) -> dict:
        self.tick(force=True)
        if self._bar is not None:
            self._bar.close()
        return self.reports[-1]
