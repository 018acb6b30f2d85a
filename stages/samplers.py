"""Which task each multitask training step takes.

Three schedules:
- round_robin: sst, para, sts, sst, ... (every task equally often, whatever its size);
- proportional: task i with probability N_i / sum_j N_j (the big task dominates);
- annealed: p_i ~ N_i^alpha with alpha decreasing over epochs (Stickland & Murray 2019,
  "BERT and PALs"): alpha = 1 - 0.8 * e / (E - 1), proportional at first, near-uniform at the end.
N_i is the task's number of training batches.
"""

import numpy as np

MODES = ("round_robin", "proportional", "annealed")


def annealed_alpha(epoch: int, epochs: int, start: float = 1.0, end: float = 0.2) -> float:
    """alpha for 0-based `epoch` of `epochs`: `start` at the first epoch, `end` at the last, linear between."""
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"annealed_alpha: epoch {epoch} is outside 0..{epochs - 1}")
    if epochs == 1:
        return float(start)
    return float(start + (end - start) * epoch / (epochs - 1))


def task_probabilities(sizes: dict[str, int], mode: str, alpha: float = 1.0) -> dict[str, float]:
    """p_i per task: proportional N_i / sum; annealed N_i^alpha normalised; round_robin uniform."""
    _check_mode(mode)
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


def epoch_tasks(batches_per_task: dict[str, int], mode: str, rng: np.random.Generator,
                alpha: float = 1.0, steps: int | None = None) -> list[str]:
    """The task of every step in one epoch.

    round_robin cycles the tasks in the given order for `steps` (default: 3 times the smallest
    task's batch count, i.e. number of tasks times the smallest count); proportional and annealed
    draw `steps` tasks (default: all tasks' batches together) from task_probabilities.
    """
    _check_mode(mode)
    tasks = [task for task, n in batches_per_task.items() if n > 0]
    if not tasks:
        raise ValueError("epoch_tasks: no task has any training batches")
    if steps is not None and steps < 1:
        raise ValueError(f"epoch_tasks: steps must be >= 1, got {steps}")
    if mode == "round_robin":
        if steps is None:
            steps = len(tasks) * min(batches_per_task[t] for t in tasks)
        return [tasks[i % len(tasks)] for i in range(steps)]
    if steps is None:
        steps = sum(batches_per_task[t] for t in tasks)
    probs = task_probabilities({t: batches_per_task[t] for t in tasks}, mode, alpha)
    draws = rng.choice(len(tasks), size=steps, p=[probs[t] for t in tasks])
    return [tasks[i] for i in draws]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sampling mode '{mode}' is not one of {list(MODES)}")
