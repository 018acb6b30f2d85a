"""Which task(s) each multitask training step takes.

One task per step:
- round_robin: sst, para, sts, sst, ... (every task equally often, whatever its size);
- proportional: task i with probability N_i / sum_j N_j (the big task dominates);
- annealed: p_i ~ N_i^alpha with alpha decreasing over epochs (Stickland & Murray 2019,
  "BERT and PALs"): alpha = 1 - 0.8 * e / (E - 1), proportional at first, near-uniform at the end;
- sequential: all sst batches, then all para, then all sts (consecutive training, every epoch).
Every task per step:
- summed: one batch of every task, the losses summed into one backward; the epoch is as long
  as the largest task (the smaller ones cycle through their batches again).
N_i is the task's number of training batches.

Per task, train.task_epochs limits the epochs a task trains in (batch_counts gives it no batches
after them, so every mode leaves it out of later epochs' plans and shares the steps among the
others) and train.data_fraction the rows it trains on (train_rows).
"""

import numpy as np

MODES = ("round_robin", "proportional", "annealed", "sequential", "summed")
RANDOM_MODES = ("proportional", "annealed")


def annealed_alpha(epoch: int, epochs: int, start: float = 1.0, end: float = 0.2) -> float:
    """alpha for 0-based `epoch` of `epochs`: `start` at the first epoch, `end` at the last, linear between."""
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"annealed_alpha: epoch {epoch} is outside 0..{epochs - 1}")
    if epochs == 1:
        return float(start)
    return float(start + (end - start) * epoch / (epochs - 1))


def batch_counts(rows_per_task: dict[str, int], batch_size: int, epoch: int,
                 task_epochs: dict[str, int | None] | None = None) -> dict[str, int]:
    """N_i for 0-based `epoch`: ceil(rows / batch_size), or 0 for a task whose `task_epochs`
    (None: every epoch) are used up."""
    task_epochs = task_epochs or {}
    counts = {}
    for task, rows in rows_per_task.items():
        last = task_epochs.get(task)
        counts[task] = 0 if last is not None and epoch >= last else -(-rows // batch_size)
    return counts


def train_rows(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """The row indices a task trains on, ascending: all of them, or a random round(fraction * n)
    (at least 1) drawn from `seed` alone, so the subset is the same in every epoch and does not
    shift the batch plan's random draws."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_rows: fraction must be in (0, 1], got {fraction}")
    if fraction == 1 or n_rows == 0:
        return np.arange(n_rows)
    size = max(1, round(fraction * n_rows))
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=size, replace=False))


def task_probabilities(sizes: dict[str, int], mode: str, alpha: float = 1.0) -> dict[str, float]:
    """p_i per task: proportional N_i / sum; annealed N_i^alpha normalised; round_robin uniform."""
    _check_mode(mode)
    if mode not in ("round_robin", *RANDOM_MODES):
        raise ValueError(f"task_probabilities: sampling mode '{mode}' does not draw tasks at random")
    sizes = {task: n for task, n in sizes.items() if n > 0}
    if not sizes:
        raise ValueError("task_probabilities: no task has any training batches")
    if mode == "round_robin":
        weights = {task: 1.0 for task in sizes}
    elif mode == "proportional":
        weights = {task: float(n) for task, n in sizes.items()}
    else:
        weights = {task: float(n) ** alpha for task, n in sizes.items()}
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


def epoch_steps(batches_per_task: dict[str, int], mode: str, rng: np.random.Generator,
                alpha: float = 1.0, steps: int | None = None) -> list[tuple[str, ...]]:
    """The tasks of every step in one epoch: a 1-tuple per step, or every task's for summed.

    summed: `steps` (default: the largest task's batch count) steps of all tasks with batches.
    The other modes: epoch_tasks, one task per step.
    """
    _check_mode(mode)
    if mode != "summed":
        return [(task,) for task in epoch_tasks(batches_per_task, mode, rng, alpha, steps)]
    tasks = _tasks_with_batches(batches_per_task, steps)
    if steps is None:
        steps = max(batches_per_task[t] for t in tasks)
    return [tuple(tasks)] * steps


def epoch_tasks(batches_per_task: dict[str, int], mode: str, rng: np.random.Generator,
                alpha: float = 1.0, steps: int | None = None) -> list[str]:
    """The task of every step in one epoch, for the one-task-per-step modes.

    round_robin cycles the tasks in the given order for `steps` (default: 3 times the smallest
    task's batch count, i.e. number of tasks times the smallest count); proportional and annealed
    draw `steps` tasks (default: all tasks' batches together) from task_probabilities;
    sequential gives each task a block of its batch count, in the given order (with `steps`,
    blocks in proportion to the batch counts, rounded so that they add up to `steps`).
    """
    _check_mode(mode)
    if mode == "summed":
        raise ValueError("epoch_tasks: summed sampling takes every task in each step; use epoch_steps")
    tasks = _tasks_with_batches(batches_per_task, steps)
    if mode == "round_robin":
        if steps is None:
            steps = len(tasks) * min(batches_per_task[t] for t in tasks)
        return [tasks[i % len(tasks)] for i in range(steps)]
    if mode == "sequential":
        counts = np.array([batches_per_task[t] for t in tasks])
        if steps is not None:
            ends = np.rint(steps * np.cumsum(counts) / counts.sum()).astype(int)
            counts = np.diff(ends, prepend=0)
        return [task for task, n in zip(tasks, counts) for _ in range(n)]
    if steps is None:
        steps = sum(batches_per_task[t] for t in tasks)
    probs = task_probabilities({t: batches_per_task[t] for t in tasks}, mode, alpha)
    draws = rng.choice(len(tasks), size=steps, p=[probs[t] for t in tasks])
    return [tasks[i] for i in draws]


def _tasks_with_batches(batches_per_task: dict[str, int], steps: int | None) -> list[str]:
    tasks = [task for task, n in batches_per_task.items() if n > 0]
    if not tasks:
        raise ValueError("epoch_tasks: no task has any training batches")
    if steps is not None and steps < 1:
        raise ValueError(f"epoch_tasks: steps must be >= 1, got {steps}")
    return tasks


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sampling mode '{mode}' is not one of {list(MODES)}")
