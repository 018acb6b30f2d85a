"""The search's small decisions (pipeline/tuning.py): how many trials fit, TPE's warm-up, the
best trial, a seeded Optuna searcher, and where ASHA may cut a trial."""

import json
import math
from types import SimpleNamespace

import pytest

from pipeline.config import PipelineConfig, apply_overrides
from pipeline.constants import METRIC
from pipeline.search_space import load_space
from pipeline.tuning import (asha_scheduler, best_record, max_concurrent, optuna_searcher, reported_epochs, startup_trials,
                             trial_records, trial_resources)
from tests.conftest import REPO


def test_concurrency_is_how_many_trials_the_resources_fit():
    assert max_concurrent({"CPU": 2}, {"cpu": 1, "gpu": 0}, trials=4) == 2
    assert max_concurrent({"CPU": 2}, {"cpu": 2, "gpu": 0}, trials=4) == 1
    assert max_concurrent({"CPU": 3}, {"cpu": 2, "gpu": 0}, trials=4) == 1  # floor(3 / 2)
    # four quarter-GPU trials share one GPU, if the CPUs allow it
    assert max_concurrent({"CPU": 16, "GPU": 1}, {"cpu": 1, "gpu": 0.25}, trials=8) == 4
    assert max_concurrent({"CPU": 3, "GPU": 1}, {"cpu": 1, "gpu": 0.25}, trials=8) == 3
    assert max_concurrent({"CPU": 16}, {"cpu": 1, "gpu": 0}, trials=3) == 3  # never more than the trials
    assert max_concurrent({"CPU": 16}, {"cpu": 0, "gpu": 0}, trials=5) == 5


def test_trial_resources_cover_the_bigger_stage():
    cfg = apply_overrides(PipelineConfig(), {"stages.finetune.num_cpus": 2, "stages.evaluate.num_cpus": 1,
                                             "stages.finetune.num_gpus": 0.25, "stages.evaluate.num_gpus": 0.5})
    assert trial_resources(cfg) == {"cpu": 2, "gpu": 0.5}


def test_tpe_warms_up_on_a_quarter_of_the_trials_between_2_and_10():
    assert [startup_trials(n) for n in (1, 4, 8, 12, 40, 100)] == [2, 2, 2, 3, 10, 10]


def test_best_trial_is_the_best_evaluated_one_and_records_keep_start_order(tmp_path):
    for trial_id, started, status, score in [("e5", 50.0, "finished", 0.41), ("b2", 20.0, "early_stopped", 0.90),
                                             ("a1", 10.0, "finished", 0.52), ("d3", 30.0, "failed", None),
                                             ("c4", 40.0, "finished", math.nan)]:
        (tmp_path / trial_id).mkdir()
        metrics = {} if score is None else {"dev/overall": score}
        (tmp_path / trial_id / "trial.json").write_text(json.dumps(
            {"trial_id": trial_id, "started": started, "status": status, "metrics": metrics, "values": {}}))
    records = trial_records(tmp_path)
    assert [r["trial_id"] for r in records] == ["a1", "b2", "d3", "c4", "e5"]
    # the early-stopped 0.90 was never evaluated as a finished model; NaN never wins
    assert best_record(records)["trial_id"] == "a1"
    assert best_record([r for r in records if r["status"] != "finished"]) is None


def test_the_optuna_search_is_seeded_and_can_start_from_the_config():
    cfg = apply_overrides(PipelineConfig(), {"train.sampling": "annealed"})
    space = load_space(REPO / "search_spaces" / "loss_and_sampling.yaml", cfg)

    def suggestions(seed, points=()):
        searcher = optuna_searcher(space, seed, trials=8, points_to_evaluate=points)
        return [searcher.suggest(f"trial{i}") for i in range(3)]

    first = suggestions(seed=1)
    assert suggestions(seed=1) == first  # the same seed, the same search
    assert suggestions(seed=2) != first
    assert set(first[0]) == set(space.params)
    for point in first:
        assert 1e-5 <= point["train.lr"] <= 3e-3 and point["train.batch_size"] in (8, 16, 32)
        assert round(point["model.dropout"] / 0.05, 9) % 1 == 0  # on the quniform grid
    own = space.config_point(cfg)
    assert suggestions(seed=1, points=[own])[0] == own  # --include-config: the config's values go first


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_asha_cuts_a_trial_only_with_an_epoch_left_to_train(epochs):
    # per trial: its dev score after each epoch; a trial reports reported_epochs, then evaluate's score
    scores = {"steady": [0.8] * epochs, "falling": [0.9] * (epochs - 1) + [0.1], "weak": [0.5] * epochs}
    reports = {name: [s[e - 1] for e in reported_epochs(epochs)] + [s[-1]] for name, s in scores.items()}
    scheduler = asha_scheduler(epochs)
    scheduler.set_search_properties(METRIC, "max")
    trials = {name: SimpleNamespace(trial_id=name) for name in scores}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    cut = {}  # trial -> the report ASHA stopped it at, before its last
    for iteration in range(1, len(reports["steady"]) + 1):
        for name, t in trials.items():
            if name not in cut:
                action = scheduler.on_trial_result(None, t, {"training_iteration": iteration,
                                                             METRIC: reports[name][iteration - 1]})
                if action == "STOP" and iteration < len(reports[name]):  # after the last, Tune ends it anyway
                    cut[name] = iteration
    # falling leads until its last epoch: it is evaluated, not cut (with the last epoch reported
    # too, the 1st epoch of a 1-epoch and the 2nd of a 2-epoch search were rungs)
    assert "falling" not in cut
    assert cut == ({} if epochs == 1 else {"weak": 1})  # with epochs to go, ASHA still cuts
