"""Planning: cache keys change exactly when a stage's inputs change; --force cascades."""

import shutil

import pytest

from pipeline import dag
from pipeline.config import PipelineConfig, apply_overrides
from pipeline.prepare import with_reference
from pipeline.store import ArtifactStore


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n0\ta\thello\t1\n")
    return apply_overrides(PipelineConfig(), {"data.dir": str(data), "model.dir": str(tiny_model_dir)})


def finish(store, planned):
    for p in planned:
        store.publish(p.stage.name, p.key, store.scratch_dir(p.stage.name, p.key), {"metrics": {}})


def test_enabled_stages_in_order(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    assert [p.stage.name for p in dag.plan(cfg, store)] == ["data_prep", "finetune", "evaluate"]
    cfg = apply_overrides(cfg, {"stages.mlm_pretrain.enabled": True})
    planned = dag.plan(cfg, store)
    assert [p.stage.name for p in planned] == ["data_prep", "mlm_pretrain", "finetune", "evaluate"]
    assert planned[2].inputs == ("data_prep", "mlm_pretrain")


def test_finished_stages_are_cache_hits(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    first = dag.plan(cfg, store)
    assert not any(p.cached for p in first)
    finish(store, first)
    again = dag.plan(cfg, store)
    assert all(p.cached for p in again)
    assert [p.key for p in again] == [p.key for p in first]


def test_half_written_output_is_not_a_cache_hit(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    p = dag.plan(cfg, store)[0]
    out = tmp_path / "a" / p.stage.name / p.key
    out.mkdir(parents=True)
    (out / "sst-train.arrow").write_text("partial")  # a crash before _SUCCESS
    assert not dag.plan(cfg, store)[0].cached


def test_a_config_change_reruns_only_the_stages_that_read_it(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    finish(store, dag.plan(cfg, store))
    changed = dag.plan(apply_overrides(cfg, {"train.lr": 1e-3}), store)
    assert [p.cached for p in changed] == [True, False, False]  # evaluate follows its new upstream
    changed = dag.plan(apply_overrides(cfg, {"data.max_length": 64}), store)
    assert [p.cached for p in changed] == [False, False, False]
    # precision changes what finetune and evaluate compute, not data_prep's tokens
    for precision in ("fp32", "bf16"):
        changed = dag.plan(apply_overrides(cfg, {"precision": precision}), store)
        assert [p.cached for p in changed] == [True, False, False]


def test_input_file_content_is_part_of_the_key(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    before = dag.plan(cfg, store)[0].key
    (tmp_path / "data" / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tbye\t1\n")
    assert dag.plan(cfg, store)[0].key != before


def test_the_users_own_files_content_and_spec_are_part_of_data_preps_key(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    sick, mine = tmp_path / "sick.tsv", tmp_path / "my-sts.tsv"
    sick.write_text("a\tb\n")
    mine.write_text("a\tb\n")
    cfg = apply_overrides(cfg, {"data.extra_eval": [{"name": "sick", "file": str(sick), "task": "sts"}],
                                "data.train_files.sts": {"file": str(mine)}})
    key = dag.plan(cfg, store)[0].key
    assert dag.plan(cfg, store)[0].key == key
    sick.write_text("a\tc\n")
    after_eval_edit = dag.plan(cfg, store)[0].key
    mine.write_text("a\tc\n")
    after_train_edit = dag.plan(cfg, store)[0].key
    rescaled = dag.plan(apply_overrides(cfg, {"data.extra_eval": [{"name": "sick", "file": str(sick), "task": "sts",
                                                                    "scale": [1, 5]}]}), store)[0].key
    assert len({key, after_eval_edit, after_train_edit, rescaled}) == 4


def test_force_cascades_downstream(cfg, tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    finish(store, dag.plan(cfg, store))
    assert [p.cached for p in dag.plan(cfg, store, ["finetune"])] == [True, False, False]
    assert [p.cached for p in dag.plan(cfg, store, ["all"])] == [False, False, False]
    with pytest.raises(ValueError, match="--force finetun: unknown stage"):
        dag.plan(cfg, store, ["finetun"])


def test_publish_keeps_the_first_finished_copy(tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    first, second = store.scratch_dir("s", "k"), store.scratch_dir("s", "k")
    (first / "x").write_text("first")
    (second / "x").write_text("second")
    store.publish("s", "k", first, {"who": 1})
    store.publish("s", "k", second, {"who": 2})  # a concurrent run finishing later
    assert store.read_result("s", "k") == {"who": 1}
    assert (tmp_path / "a" / "s" / "k" / "x").read_text() == "first"
    assert not second.exists()


def test_pyarrow_uri_store_round_trip(tmp_path):
    store = ArtifactStore((tmp_path / "remote").as_uri())  # file:// goes through pyarrow.fs
    scratch = store.scratch_dir("s", "k")
    (scratch / "model").mkdir()
    (scratch / "model" / "w.bin").write_bytes(b"abc")
    store.publish("s", "k", scratch, {"metrics": {"m": 1.0}})
    assert store.is_finished("s", "k")
    assert store.read_result("s", "k")["metrics"] == {"m": 1.0}
    local = store.local_dir("s", "k", cache=tmp_path / "cache")
    assert (local / "model" / "w.bin").read_bytes() == b"abc"


def test_only_force_marks_stages_forced(cfg, tmp_path):
    """`forced` (start over, replace the published output) comes from --force and cascades
    from it; a stage merely not cached yet may take a concurrent run's output instead."""
    store = ArtifactStore(str(tmp_path / "a"))
    assert [p.forced for p in dag.plan(cfg, store)] == [False, False, False]
    finish(store, dag.plan(cfg, store))
    assert [p.forced for p in dag.plan(cfg, store, ["finetune"])] == [False, True, True]


def test_the_reference_is_planned_by_ablate_and_tune_once_per_data_and_backbone(cfg, tmp_path, tiny_model_dir):
    """stages.reference null: off in a plain plan, on after prepare.with_reference (ablate, tune);
    its key reads data and backbone, not the seed or the training config."""
    store = ArtifactStore(str(tmp_path / "a"))
    assert "reference" not in [p.stage.name for p in dag.plan(cfg, store)]
    assert not with_reference(apply_overrides(cfg, {"stages.reference.enabled": False})).stages.reference.enabled

    def reference(overrides):
        planned = dag.plan(with_reference(apply_overrides(cfg, overrides)), store)
        return next(p for p in planned if p.stage.name == "reference")

    base = reference({})
    assert base.inputs == ("data_prep",)
    assert reference({"seed": 7, "train.lr": 1e-3, "model.pooling": "mean"}).key == base.key
    assert reference({"model.dir": str(shutil.copytree(tiny_model_dir, tmp_path / "other-bert"))}).key != base.key
    assert reference({"train.eval_batch_size": 8}).key != base.key
    assert reference({"data.max_length": 16}).key != base.key  # through data_prep's key


def test_peak_memory_counts_from_the_stage_start_not_the_worker_start():
    """A reused Ray worker remembers its last task's peak; each stage's count starts afresh."""
    from pathlib import Path as P

    if not P("/proc/self/clear_refs").exists():
        pytest.skip("peak reset needs Linux /proc")
    dag._reset_peak_memory()
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident, not just reserved
    with_block = dag._peak_memory()["stage/peak_rss_mb"]
    del block
    dag._reset_peak_memory()
    after_reset = dag._peak_memory()["stage/peak_rss_mb"]
    assert with_block - after_reset > 250
