import math
from collections import Counter

import numpy as np
import pytest

from stages.samplers import annealed_alpha, batch_counts, epoch_steps, epoch_tasks, task_probabilities, train_rows


def test_annealed_alpha_defaults_run_from_1_to_0_2():
    assert annealed_alpha(0, 5) == pytest.approx(1.0)
    assert annealed_alpha(4, 5) == pytest.approx(0.2)
    # Stickland & Murray: alpha = 1 - 0.8 * e / (E - 1); e = 2, E = 5 -> 0.6
    assert annealed_alpha(2, 5) == pytest.approx(0.6)
    assert annealed_alpha(0, 1) == 1.0
    assert annealed_alpha(1, 3, start=0.5, end=0.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        annealed_alpha(5, 5)


def test_task_probabilities_hand_values():
    sizes = {"sst": 300, "para": 100, "sts": 100}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"sst": 0.6, "para": 0.2, "sts": 0.2})
    assert task_probabilities(sizes, "round_robin") == pytest.approx({"sst": 1 / 3, "para": 1 / 3, "sts": 1 / 3})
    # alpha 0.5: sqrt(400)=20, sqrt(100)=10, sqrt(100)=10 for sizes 400/100/100
    p = task_probabilities({"sst": 400, "para": 100, "sts": 100}, "annealed", alpha=0.5)
    assert p == pytest.approx({"sst": 0.5, "para": 0.25, "sts": 0.25})
    # alpha 1 is proportional; alpha 0 is uniform
    assert task_probabilities(sizes, "annealed", 1.0) == pytest.approx(task_probabilities(sizes, "proportional"))
    assert task_probabilities(sizes, "annealed", 0.0) == pytest.approx(task_probabilities(sizes, "round_robin"))
    with pytest.raises(ValueError, match="sampling mode"):
        task_probabilities(sizes, "temperature")


def _check_frequencies(tasks, probs):
    n = len(tasks)
    counts = Counter(tasks)
    assert set(counts) <= set(probs)
    for task, p in probs.items():
        std = math.sqrt(n * p * (1 - p))
        assert abs(counts[task] - n * p) < 4 * std, (task, counts[task], n * p, std)


@pytest.mark.parametrize("mode,alpha", [("proportional", 1.0), ("annealed", 0.2), ("annealed", 0.6)])
def test_empirical_frequencies_match_probabilities(mode, alpha):
    sizes = {"sst": 267, "para": 1000, "sts": 45}
    tasks = epoch_tasks(sizes, mode, np.random.default_rng(0), alpha=alpha, steps=20000)
    assert len(tasks) == 20000
    _check_frequencies(tasks, task_probabilities(sizes, mode, alpha))


def test_annealing_moves_towards_uniform():
    sizes = {"sst": 267, "para": 1000, "sts": 45}
    first = task_probabilities(sizes, "annealed", annealed_alpha(0, 3))
    last = task_probabilities(sizes, "annealed", annealed_alpha(2, 3))
    assert last["sts"] > first["sts"] and last["para"] < first["para"]


def test_default_steps_is_all_batches_for_random_modes():
    tasks = epoch_tasks({"sst": 7, "para": 11, "sts": 3}, "proportional", np.random.default_rng(1))
    assert len(tasks) == 21


def test_round_robin_order_and_default_length():
    tasks = epoch_tasks({"sst": 4, "para": 10, "sts": 2}, "round_robin", np.random.default_rng(0))
    assert tasks == ["sst", "para", "sts"] * 2
    tasks = epoch_tasks({"sst": 4, "para": 10, "sts": 2}, "round_robin", np.random.default_rng(0), steps=5)
    assert tasks == ["sst", "para", "sts", "sst", "para"]


def test_tasks_without_batches_are_never_drawn():
    tasks = epoch_tasks({"sst": 5, "para": 0, "sts": 5}, "round_robin", np.random.default_rng(0))
    assert tasks == ["sst", "sts"] * 5
    tasks = epoch_tasks({"sst": 5, "para": 0, "sts": 5}, "proportional", np.random.default_rng(0), steps=200)
    assert "para" not in tasks
    with pytest.raises(ValueError, match="no task"):
        epoch_tasks({"sst": 0}, "proportional", np.random.default_rng(0))


def test_same_seed_same_order():
    sizes = {"sst": 5, "para": 9, "sts": 4}
    a = epoch_tasks(sizes, "annealed", np.random.default_rng(3), alpha=0.5)
    b = epoch_tasks(sizes, "annealed", np.random.default_rng(3), alpha=0.5)
    assert a == b


def test_annealed_alpha_first_and_last_epoch_of_a_real_run():
    assert [annealed_alpha(e, 3) for e in range(3)] == pytest.approx([1.0, 0.6, 0.2])
    assert annealed_alpha(0, 10) == 1.0 and annealed_alpha(9, 10) == pytest.approx(0.2)


def test_summed_steps_take_every_task_for_the_largest_tasks_length():
    steps = epoch_steps({"sst": 4, "para": 10, "sts": 2}, "summed", np.random.default_rng(0))
    assert steps == [("sst", "para", "sts")] * 10
    steps = epoch_steps({"sst": 4, "para": 0, "sts": 2}, "summed", np.random.default_rng(0), steps=3)
    assert steps == [("sst", "sts")] * 3
    with pytest.raises(ValueError, match="epoch_steps"):
        epoch_tasks({"sst": 4}, "summed", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at random"):
        task_probabilities({"sst": 4}, "summed")


def test_sequential_trains_each_task_in_a_block():
    tasks = epoch_tasks({"sst": 3, "para": 5, "sts": 2}, "sequential", np.random.default_rng(0))
    assert tasks == ["sst"] * 3 + ["para"] * 5 + ["sts"] * 2
    # steps=5 of 10 batches: block ends at rint(5 * [3, 8, 10] / 10) = [2, 4, 5]
    tasks = epoch_tasks({"sst": 3, "para": 5, "sts": 2}, "sequential", np.random.default_rng(0), steps=5)
    assert tasks == ["sst", "sst", "para", "para", "sts"]
    steps = epoch_steps({"sst": 1, "para": 0, "sts": 2}, "sequential", np.random.default_rng(0))
    assert steps == [("sst",), ("sts",), ("sts",)]


def test_one_task_modes_give_one_tuples():
    sizes = {"sst": 5, "para": 9, "sts": 4}
    assert epoch_steps(sizes, "annealed", np.random.default_rng(3), alpha=0.5) == \
        [(t,) for t in epoch_tasks(sizes, "annealed", np.random.default_rng(3), alpha=0.5)]


# ---------------------------------------------------------------- per-task epochs and train rows


def test_batch_counts_drop_a_task_after_its_epochs():
    rows = {"sst": 40, "para": 33, "sts": 16}
    # batch 16: ceil(40/16) = 3, ceil(33/16) = 3, 16/16 = 1
    assert batch_counts(rows, 16, epoch=0) == {"sst": 3, "para": 3, "sts": 1}
    # para trains 1 epoch, sts 2: 0-based epoch 1 has no para, epoch 2 neither para nor sts
    limits = {"sst": None, "para": 1, "sts": 2}
    assert batch_counts(rows, 16, 0, limits) == {"sst": 3, "para": 3, "sts": 1}
    assert batch_counts(rows, 16, 1, limits) == {"sst": 3, "para": 0, "sts": 1}
    assert batch_counts(rows, 16, 2, limits) == {"sst": 3, "para": 0, "sts": 0}


@pytest.mark.parametrize("mode", ["round_robin", "proportional", "annealed", "sequential", "summed"])
def test_a_task_whose_epochs_are_used_up_is_absent_from_later_plans(mode):
    rows, limits = {"sst": 64, "para": 160, "sts": 32}, {"sst": None, "para": 1, "sts": None}
    rng = np.random.default_rng(0)
    plans = [epoch_steps(batch_counts(rows, 16, e, limits), mode, rng) for e in range(3)]
    tasks = [{t for step in plan for t in step} for plan in plans]
    assert tasks[0] == {"sst", "para", "sts"}
    assert tasks[1] == tasks[2] == {"sst", "sts"}
    # the epochs without para are as long as the mode makes an epoch of sst (4 batches) and sts (2)
    expected = {"round_robin": 2 * 2, "proportional": 4 + 2, "annealed": 4 + 2, "sequential": 4 + 2, "summed": 4}
    assert len(plans[1]) == expected[mode]
    if mode == "sequential":
        assert plans[1] == [("sst",)] * 4 + [("sts",)] * 2


def test_train_rows_all_or_a_seeded_fraction():
    np.testing.assert_array_equal(train_rows(7, 1.0, seed=3), np.arange(7))
    part = train_rows(48, 0.25, seed=3)
    assert len(part) == 12 and len(set(part.tolist())) == 12  # round(0.25 * 48), no row twice
    assert (np.diff(part) > 0).all() and 0 <= part.min() and part.max() < 48
    np.testing.assert_array_equal(part, train_rows(48, 0.25, seed=3))  # the seed alone decides
    assert not np.array_equal(part, train_rows(48, 0.25, seed=4))
    assert len(train_rows(48, 0.1, seed=0)) == 5  # round(4.8)
    assert len(train_rows(5, 0.01, seed=0)) == 1  # never an empty task
    with pytest.raises(ValueError, match="fraction"):
        train_rows(5, 0.0, seed=0)
