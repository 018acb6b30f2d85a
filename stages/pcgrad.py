"""PCGrad, "Gradient Surgery for Multi-Task Learning" (Yu et al. 2020), on flattened gradients.

For each task i and each other task j in random order: when g_i . g_j < 0 (the two tasks pull
the shared weights apart), remove from g_i its component along g_j,
g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j. The update is the sum of the projected g_i.
Projections use the other tasks' original gradients (Algorithm 1 of the paper).

Written here rather than taken from pytorch-optimizer, whose PCGrad wraps the optimizer and
runs backward itself, so it would not compose with finetune's loss weighting, gradient
clipping and SMART terms. finetune applies it only to parameters that at least two tasks'
losses reach (the shared encoder); task-specific heads keep their own gradients.
"""

import numpy as np
import torch
from torch import Tensor


def project_conflicting(grads: list[Tensor], rng: np.random.Generator) -> Tensor:
    """Sum of the PCGrad-projected per-task gradients; `grads` are 1-D tensors of one length."""
    if not grads:
        raise ValueError("project_conflicting: no gradients given")
    if any(g.ndim != 1 or g.shape != grads[0].shape for g in grads):
        raise ValueError(f"project_conflicting: expected 1-D gradients of one length, got shapes "
                         f"{[tuple(g.shape) for g in grads]}")
    # Dot products in fp64: a 20M-long fp32 sum loses enough precision to flip a near-zero sign.
    originals = [g.double() for g in grads]
    total = torch.zeros_like(originals[0])
    for i, g_i in enumerate(originals):
        projected = g_i.clone()
        for j in rng.permutation([j for j in range(len(originals)) if j != i]):
            g_j = originals[int(j)]
            dot = torch.dot(projected, g_j)
            if dot < 0:
                projected -= dot / torch.dot(g_j, g_j) * g_j
        total += projected
    return total.to(grads[0].dtype)


def pcgrad_backward(task_losses: dict[str, Tensor], params: list[Tensor], rng: np.random.Generator) -> None:
    """Fill p.grad for `params` from the per-task losses: PCGrad on the parameters that two or
    more tasks reach, the plain sum of gradients on the rest (a parameter one task alone reaches)."""
    per_task = [torch.autograd.grad(loss, params, allow_unused=True) for loss in task_losses.values()]
    shared = [k for k in range(len(params)) if sum(g[k] is not None for g in per_task) >= 2]
    shared_set = set(shared)
    for k, p in enumerate(params):
        if k in shared_set:
            continue
        present = [g[k] for g in per_task if g[k] is not None]
        if present:
            _accumulate(p, present[0])
    if not shared:
        return
    flat = [torch.cat([(g[k] if g[k] is not None else torch.zeros_like(params[k])).reshape(-1) for k in shared])
            for g in per_task]
    combined = project_conflicting(flat, rng)
    offset = 0
    for k in shared:
        n = params[k].numel()
        _accumulate(params[k], combined[offset:offset + n].view_as(params[k]))
        offset += n


def _accumulate(p: Tensor, grad: Tensor) -> None:
    p.grad = grad.detach().clone() if p.grad is None else p.grad + grad
