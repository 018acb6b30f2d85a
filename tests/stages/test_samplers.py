import math
from collections import Counter

import numpy as np
import pytest

from stages.samplers import annealed_alpha, epoch_steps, epoch_tasks, task_probabilities


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
