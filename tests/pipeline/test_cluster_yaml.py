"""cluster.yaml passes Ray's own launcher validation and agrees with the rest of the project."""

import copy
import re

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import load_config
from tests.conftest import REPO

CLUSTER = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def launcher_check(config: dict) -> dict:
    """What `ray up` does with the file before launching anything: fill defaults, validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_validates_it(cluster):
    prepared = launcher_check(cluster)
    assert prepared["head_node_type"] == "head"


def test_the_validator_rejects_experiment_keys(cluster):
    # Why the experiment stays in pipeline.yaml: the launcher refuses keys it does not know.
    with pytest.raises(ValidationError, match="'train' was unexpected"):
        launcher_check({**cluster, "train": {"lr": 1e-4}})


def test_gpu_work_lands_on_gpu_workers(cluster):
    types = cluster["available_node_types"]
    assert types["head"]["resources"]["GPU"] == 0  # stages asking for num_gpus go to workers
    worker = types["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    assert worker["min_workers"] <= worker["max_workers"] <= cluster["max_workers"]


def test_it_installs_the_pinned_project(cluster):
    setup = "\n".join(cluster["setup_commands"])
    torch_pin = re.search(r"^TORCH \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert torch_pin in setup  # the same torch as `make`, as a CUDA build
    assert "-r /home/ray/minbert/requirements.txt" in setup
    ray_pin = re.search(r"^ray\[[^\]]*\]==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-py311")  # the image's Ray is the pinned one
    assert "/home/ray/minbert" in cluster["file_mounts"] and cluster["file_mounts"]["/home/ray/minbert"] == "."


def test_the_data_mount_is_the_default_configs_data(cluster):
    local = cluster["file_mounts"]["/home/ray/data/cs224n"]
    cfg = load_config(REPO / "pipeline.yaml")
    assert (REPO / local).resolve() == (REPO / cfg.data.dir).resolve()
    assert {".venv", "artifacts", "mlruns", ".git"} <= set(cluster["rsync_exclude"])
