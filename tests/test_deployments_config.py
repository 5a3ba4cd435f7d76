"""infra/prefect.yaml and the deployment entry flows, without a server (fast)."""

from pathlib import Path

import yaml

from flows.deployments import curate_dataset, gpus_needed, synthesize_recipe
from schemas.recipe import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_is_valid_for_prefect_deploy():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"nightly-synthesis", "curate-new-seeds"}
    assert by_name["nightly-synthesis"].entrypoint == "flows/deployments.py:synthesize_recipe"
    assert by_name["curate-new-seeds"].entrypoint == "flows/deployments.py:curate_dataset"
    for d in model.deployments:
        assert d.schedules and d.schedules[0].cron and d.schedules[0].timezone == "UTC"
        path, _ = d.entrypoint.split(":")
        assert (ROOT / path).is_file()
    # no git clone or storage pull: the project directory recorded at deploy time
    assert list(model.pull[0]) == ["prefect.deployments.steps.set_working_directory"]


def test_entry_flows_take_json_parameters():
    from prefect.utilities.callables import parameter_schema

    synth = parameter_schema(synthesize_recipe).model_dump()
    assert synth["required"] == ["recipe_path"]
    assert set(synth["properties"]) == {"recipe_path", "store", "overrides"}
    curate = parameter_schema(curate_dataset).model_dump()
    assert set(curate["required"]) == {"input_uri", "name"}


def test_gpus_needed():
    assert gpus_needed(EngineConfig()) == 0
    assert gpus_needed(EngineConfig(replicas=2, gpus_per_replica=1)) == 2
    assert gpus_needed(EngineConfig(replicas=1, gpus_per_replica=1, tensor_parallel_size=4)) == 4
    assert gpus_needed(EngineConfig(replicas=3, gpus_per_replica=0.5)) == 2
