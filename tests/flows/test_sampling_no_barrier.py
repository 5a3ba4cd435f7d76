"""Adaptive sampling has no round barrier: a problem's next samples go to the engines as soon as
its own shard is verified, while other shards of the first round are still generating.

The real ``synthesize`` flow in-process with the scripted generator (fast tier). Two shards of two
problems; the first shard's first problem is never solved, so it needs a second round. The
second shard's generation does not return until that second-round request has reached the
generator: with a barrier between rounds (every first-round shard back before any second-round
shard goes out) it would never come, and the shard gives up after ``WAIT_S``.
"""

import threading

from distillery.stages.ingest import ingest_seeds
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/rewards-best-of-n.yaml"
SETS = ["seeds.builtin.count=4", "generation.shard_size=2", "score.method=majority_vote", "generation.max_tokens=64"]
WAIT_S = 60.0


def test_a_problems_next_round_goes_out_while_other_shards_generate(scripted, tmp_path):
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    ids, answers = seeds["seed_id"].to_list(), seeds["reference_answer"].to_list()
    unsolved, second_shard = ids[0], set(ids[2:])
    second_round_asked = threading.Event()
    waited: list[bool] = []

    @scripted.rule
    def sample(request, sampling):
        seed_id, index = request["seed_id"], request["sample_index"]
        if seed_id == unsolved:
            if index >= recipe.generation.samples_per_problem:
                second_round_asked.set()
            return distinct_text(f"{seed_id}-{index}", "999")  # never right
        if seed_id in second_shard and index == 0 and not waited:
            waited.append(second_round_asked.wait(WAIT_S))  # the shard stays in flight until then
        return distinct_text(f"{seed_id}-{index}", answers[ids.index(seed_id)])

    store = tmp_path / "store"
    uri, manifest = run_flow(RECIPE, store, SETS)

    assert waited == [True], "the second round waited for every first-round shard (a round barrier)"
    budget = recipe.generation.adaptive.max_samples
    # the unsolved problem used its whole budget; the others stopped after their first round
    assert manifest["stats"]["sampling"]["samples_spent_histogram"] == {str(budget): 1, "4": 3}
    asked = sorted((r["seed_id"], r["sample_index"]) for r in scripted.requests)
    assert asked == sorted([(unsolved, k) for k in range(budget)] + [(s, k) for s in ids[1:] for k in range(4)])
    synth = check_stages(manifest, ["ingest", "synthesize", "verify"])[1]
    assert (synth["rows_in"], synth["fanout"], synth["rows_out"]) == (4, budget, budget + 12)

    # the run's progress artifact, as the Prefect UI shows it: all requests done at the end
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    this_run = ArtifactFilterFlowRunId(any_=[UUID(manifest["flow_run_id"])])  # other tests' runs made theirs too
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["generation-progress"]), flow_run_id=this_run))
    assert artifact.type == "progress" and float(artifact.data) == 100.0
    assert f"{budget + 12}/{budget + 12} requests" in artifact.description

    # the lines a run ends with (distillery run prints them before the URI)
    from distillery.cli import run_summary

    summary = run_summary(str(uri), str(store)).splitlines()
    published = manifest["counts"]["published"]
    assert summary[0] == f"published rewards-best-of-n {uri.name}: {published} rows from 4 input rows ({manifest['counts']['rejected']} rejected, each with its reason)"
    assert summary[1].startswith(f"  samples: {budget + 12} generated, {manifest['stats']['samples_correct']} verified correct (")
    assert summary[2:] == [f"  data:      {uri}/data", f"  card:      distillery datasets show rewards-best-of-n {uri.name} --store {store}", f"  dashboard: distillery ui --store {store}"]
