"""Generation progress: requests done of total, output tokens/s and time left, from the engines'
own counts (which move per finished request), or from what came back when a generator has none."""

import logging

from distillery.progress import GenerationProgress, duration


class Counting:
    """Answers ``progress()`` like ``EnginePool.progress``: cumulative counts of the engines."""

    def __init__(self) -> None:
        self.counts = {"done": 40, "tokens": 4000}  # work done before this sampling began

    def progress(self):
        return dict(self.counts)


def test_counts_come_from_the_engines_since_the_start(caplog):
    gen = Counting()
    logger = logging.getLogger("test-progress")
    now = [1000.0]
    progress = GenerationProgress(gen, logger, every_s=10, bar=False, artifact=False, clock=lambda: now[0])
    progress.submitted(100)
    now[0] += 10
    gen.counts = {"done": 65, "tokens": 6500}  # 25 requests and 2500 tokens since
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.tick()
    snap = progress.reports[-1]
    assert (snap["done"], snap["total"], snap["tokens_per_s"], snap["eta_s"]) == (25, 100, 250.0, 30.0)  # 2.5 requests/s
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "generation: 25/100 requests (25%), 250 output tok/s, about 30s left"


def test_the_requests_the_engines_hold_are_shown_where_they_count_them(caplog):
    gen = Counting()
    logger = logging.getLogger("test-progress-held")
    progress = GenerationProgress(gen, logger, every_s=3600, bar=False, artifact=False)
    progress.submitted(100)
    gen.counts = {"done": 50, "tokens": 5000, "in_flight": 64}  # EngineLoop.stats: 64 requests in the batch
    with caplog.at_level(logging.INFO, logger="test-progress-held"):
        progress.tick(force=True)
    assert progress.reports[-1]["in_engines"] == 64
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("generation: 10/100 requests (10%), 64 in the engines, ")


def test_without_engine_counts_what_came_back_counts():
    progress = GenerationProgress(object(), logging.getLogger("x"), every_s=3600, bar=False, artifact=False)
    progress.submitted(10)
    progress.came_back(4, 400)
    progress.tick()  # not yet: every_s has not passed
    assert progress.reports == []
    assert progress.close()["done"] == 4  # close always reports


def test_a_report_at_most_every_interval():
    gen = Counting()
    progress = GenerationProgress(gen, logging.getLogger("x"), every_s=3600, bar=False, artifact=False)
    progress.submitted(50)
    for _ in range(5):
        progress.tick()
    assert progress.reports == []
    progress.tick(force=True)
    assert len(progress.reports) == 1


def test_durations_read_as_minutes_and_seconds():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
