"""differences.add_intervals on a real MLflow sqlite store and a real artifact store laid out as an
ablation leaves them: each row's dev predictions are found and bootstrapped against the baseline's."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import comparison, differences, tracking
from pipeline.store import ArtifactStore

GOLD = [0, 1, 2, 3, 4, 0, 1, 2]


def write_data_prep(store: ArtifactStore, key: str) -> None:
    folder = Path(store.root) / "data_prep" / key
    folder.mkdir(parents=True)
    table = pa.table({"id": [f"s{i}" for i in range(len(GOLD))], "label": pa.array(GOLD, pa.int64())})
    with pa.OSFile(str(folder / "sst-dev.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "manifest.json").write_text(json.dumps({"splits": {"sst-dev": {"file": "sst-dev.arrow"}}}))
    (folder / "_SUCCESS").write_text("")


def write_evaluate(store: ArtifactStore, key: str, preds: list[int]) -> None:
    folder = Path(store.root) / "evaluate" / key / "predictions"
    folder.mkdir(parents=True)
    # The starter's lines, in another order than the gold: rows are matched by id.
    lines = ["id \t Predicted_Sentiment \n"] + [f"s{i} , {p} \n" for i, p in reversed(list(enumerate(preds)))]
    (folder / "sst-dev-output.csv").write_text("".join(lines))
    (folder.parent / "_SUCCESS").write_text("")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """A parent, a shared data_prep, and baseline / better / same variants at two seeds each (one
    store for the module: a new sqlite store costs seconds; the test that deletes outputs runs last)."""
    tmp_path = tmp_path_factory.mktemp("differences")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = ArtifactStore(str(tmp_path / "artifacts"))
    experiment = tracking.ensure_experiment(uri, "differences")
    parent = tracking.start_run(uri, experiment, "ablation t", {"stage": "ablation",
                                                                 "ablation_variants": "baseline,better,same"})
    tracking.start_run(uri, experiment, "data_prep", {"stage": "data_prep", "cache_key": "prep"}, parent_id=parent)
    write_data_prep(store, "prep")
    wrong = [(g + 1) % 5 for g in GOLD]
    outputs = {"baseline": {"1": wrong, "2": GOLD[:4] + wrong[4:]}, "better": {"1": GOLD, "2": GOLD},
               "same": {"1": wrong, "2": GOLD[:4] + wrong[4:]}}
    for variant, seeds in outputs.items():
        for seed, preds in seeds.items():
            run = tracking.start_run(uri, experiment, f"{variant} seed {seed}",
                                     {"stage": "variant", "ablation": variant, "seed": seed}, parent_id=parent,
                                     params={"artifacts": str(tmp_path / "artifacts")})
            accuracy = sum(p == g for p, g in zip(preds, GOLD)) / len(GOLD)
            tracking.log_metrics(uri, run, {"dev/sst_acc": accuracy})
            key = f"{variant}-{seed}"
            tracking.start_run(uri, experiment, "evaluate", {"stage": "evaluate", "cache_key": key}, parent_id=run)
            write_evaluate(store, key, preds)
            tracking.end_run(uri, run)
    return uri, parent, store


def test_intervals_of_a_variant_right_everywhere_and_of_one_identical_to_the_baseline(ablation):
    uri, parent, store = ablation
    tags, groups = comparison.comparison(uri, parent)
    note = differences.add_intervals(uri, parent, groups, comparison.reference_label(tags, groups), store)
    assert note is None
    base, better, same = groups
    assert base.ci == {}
    # Identical predictions at both seeds: every resample's difference is 0.
    assert same.ci["dev/sst_acc"] == (0.0, 0.0) and not differences.bootstrap.excludes_zero(same.ci["dev/sst_acc"])
    # Seed 1: the baseline is wrong everywhere (difference 1 on every resample); seed 2: right on
    # the first half (difference = the resample's share of the second half, 0 only when all 8
    # draws fall in the first half, 1 in 256). The interval lies in (0, 1] and excludes 0.
    low, high = better.ci["dev/sst_acc"]
    assert 0 < low < high <= 1 and differences.bootstrap.excludes_zero((low, high))
    assert better.delta["dev/sst_acc"] == pytest.approx(0.75)
    assert "dev/overall" not in better.ci  # sst only: no overall score to bootstrap


def test_any_pair_of_rows_is_bootstrapped_on_the_same_resamples_as_the_table(ablation):
    """`same` predicts as the baseline does, so `better` against `same` is `better` against the
    baseline resample for resample, and the pair taken the other way round is its negation."""
    uri, parent, store = ablation
    tags, groups = comparison.comparison(uri, parent)
    differences.add_intervals(uri, parent, groups, "baseline", store)
    found, note = differences.pair_differences(uri, parent, groups, [("better", "same"), ("same", "better"),
                                                                     ("better", "nowhere")], store)
    assert note is None and set(found) == {("better", "same"), ("same", "better")}
    forward, backward = found[("better", "same")]["dev/sst_acc"], found[("same", "better")]["dev/sst_acc"]
    assert differences.bootstrap.interval(forward) == groups[1].ci["dev/sst_acc"]
    assert (forward == -backward).all() and forward.std() > 0


def test_rows_that_share_their_evaluate_are_found_through_the_parents_shared_run(ablation):
    """Two variants that resolve to the same config share one evaluate run under the parent
    (tag shared_by); each row's predictions are that run's output."""
    uri, _, store = ablation
    experiment = tracking.ensure_experiment(uri, "differences")
    parent = tracking.start_run(uri, experiment, "ablation twins", {"stage": "ablation",
                                                                     "ablation_variants": "baseline,twin"})
    tracking.start_run(uri, experiment, "data_prep", {"stage": "data_prep", "cache_key": "prep-twins"}, parent_id=parent)
    write_data_prep(store, "prep-twins")
    tracking.start_run(uri, experiment, "evaluate", {"stage": "evaluate", "cache_key": "twins", "shared_by": "baseline,twin"},
                       parent_id=parent)
    write_evaluate(store, "twins", [(g + 1) % 5 for g in GOLD])
    for variant in ("baseline", "twin"):
        run = tracking.start_run(uri, experiment, variant, {"stage": "variant", "ablation": variant, "seed": "1"},
                                 parent_id=parent, params={"artifacts": str(store.root)})
        tracking.log_metrics(uri, run, {"dev/sst_acc": 0.0})
        tracking.end_run(uri, run)
    tags, groups = comparison.comparison(uri, parent)
    assert differences.add_intervals(uri, parent, groups, "baseline", store) is None
    assert groups[1].ci["dev/sst_acc"] == (0.0, 0.0)


def test_missing_outputs_are_said_not_raised(ablation):
    uri, parent, store = ablation
    shutil.rmtree(f"{store.root}/evaluate/same-2")
    tags, groups = comparison.comparison(uri, parent)
    note = differences.add_intervals(uri, parent, groups, comparison.reference_label(tags, groups), store)
    assert note == "no intervals for same seed 2: their dev predictions were not found"
    assert groups[1].ci and groups[2].ci  # same pairs its seed 1 only
    shutil.rmtree(f"{store.root}/data_prep/prep")
    tags, groups = comparison.comparison(uri, parent)
    assert "were not found" in differences.add_intervals(uri, parent, groups, "baseline", store)
    assert all(not g.ci for g in groups)


def test_rows_pair_by_seed_and_in_order_when_no_seed_matches():
    def row(label, seed):
        return comparison.RunRow(label, f"{label}-{seed}", "FINISHED", seed, {}, None, None)

    base = [row("baseline", "1"), row("baseline", "2")]
    assert [(b.seed, v.seed) for b, v in differences._seed_pairs(base, [row("v", "2"), row("v", "3")])] == [("2", "2")]
    # A variant that sets its own seed shares none: its runs pair with the baseline's in order.
    assert [(b.seed, v.seed) for b, v in differences._seed_pairs(base, [row("v", "7"), row("v", "8")])] == [
        ("1", "7"), ("2", "8")]
