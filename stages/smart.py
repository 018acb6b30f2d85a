"""SMART (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
Language Models through Principled Regularized Optimization"), for finetune.

Two extra loss terms per batch:
- smoothness-inducing adversarial regularisation: perturb the word-embedding outputs x by
  delta ~ N(0, noise_std^2), take one ascent step of size step_size on
  D(f(x + delta), f(x)) along the inf-norm-normalised gradient, project delta back to the
  inf-norm ball of radius epsilon, then add weight * D_sym(f(x + delta), f(x));
- Bregman proximal point: proximal_weight * D_sym(f(x), f_tilde(x)), f_tilde a copy of the
  model whose weights follow the model with momentum proximal_beta after every step.
D_sym is the symmetric divergence of the task's output: symmetric KL of the sst class
distributions and of the para Bernoulli, squared error of the sts scores (and of a para
output that is a number rather than a logit, model.regression_output: a cosine or a 0/1
regression).

Every extra forward pass replays the random state of the clean pass, so dropout draws the same
masks and a term measures only the perturbation (zero perturbation, zero term).
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Keeps the inf-norm normalisation of an all-zero gradient at zero instead of 0/0.
_GRAD_NORM_FLOOR = 1e-12


def capture_rng(device: torch.device) -> tuple:
    """The random state before a clean forward pass, for the extra passes to replay."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def smart_adversarial_loss(model: nn.Module, task: str, batch: dict, clean_output: Tensor, smart_cfg,
                           rng_state: tuple | None = None) -> Tensor:
    """weight * D_sym(f(x + delta), f(x)) with delta the one-step adversarial perturbation.

    `clean_output` is model(task, batch) from the training step (with its graph: the term's
    gradient reaches the weights through both outputs); `rng_state` is capture_rng() from just
    before that pass, so dropout matches.
    """
    if smart_cfg.weight == 0:
        return clean_output.new_zeros(()).float()
    device = clean_output.device
    # The noise has its own generator: drawn from the global one inside the replayed passes it
    # would shift the dropout masks away from the clean pass's.
    generator = torch.Generator(device).manual_seed(int(torch.randint(2 ** 62, ())))
    perturbation = _EmbeddingPerturbation(model, smart_cfg.noise_std, generator)
    with perturbation.active(), _running_stats_untouched(model):
        noisy = perturbation.forward(model, task, batch, device, rng_state)
        ascent = symmetric_divergence(task, noisy, clean_output.detach(), _regression(model, task))
        grads = torch.autograd.grad(ascent, perturbation.deltas, allow_unused=True)
        perturbation.deltas = [_ascend(d, g, smart_cfg.step_size, smart_cfg.epsilon)
                               for d, g in zip(perturbation.deltas, grads)]
        adversarial = perturbation.forward(model, task, batch, device, rng_state)
    return smart_cfg.weight * symmetric_divergence(task, adversarial, clean_output, _regression(model, task))


@contextmanager
def _running_stats_untouched(model: nn.Module):
    """The extra train-mode passes normalise with batch statistics, as the clean pass does, but
    leave BatchNorm's running statistics (deep heads) alone: moved by perturbed inputs they would
    be wrong, and written in place they would break the backward of the clean pass, whose graph
    holds them (a copy put back afterwards is a write too)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def make_proximal_copy(model: nn.Module) -> nn.Module:
    """f_tilde: a frozen copy of the model (train mode, so its dropout replays the model's)."""
    proximal = copy.deepcopy(model)
    for p in proximal.parameters():
        p.requires_grad_(False)
    return proximal


def proximal_loss(proximal: nn.Module, task: str, batch: dict, clean_output: Tensor, smart_cfg,
                  rng_state: tuple | None = None) -> Tensor:
    """proximal_weight * D_sym(f(x), f_tilde(x)); zero when proximal_weight is 0."""
    if smart_cfg.proximal_weight == 0:
        return clean_output.new_zeros(()).float()
    with torch.no_grad():
        proximal.train()
        anchor = _forward(proximal, task, batch, clean_output.device, rng_state)
    return smart_cfg.proximal_weight * symmetric_divergence(task, clean_output, anchor, _regression(proximal, task))


@torch.no_grad()
def update_proximal(proximal: nn.Module, model: nn.Module, beta: float) -> None:
    """theta_tilde <- beta * theta_tilde + (1 - beta) * theta; buffers (BatchNorm stats) copied."""
    for p_tilde, p in zip(proximal.parameters(), model.parameters()):
        p_tilde.lerp_(p.detach(), 1.0 - beta)
    for b_tilde, b in zip(proximal.buffers(), model.buffers()):
        b_tilde.copy_(b)


def symmetric_divergence(task: str, a: Tensor, b: Tensor, regression: bool = False) -> Tensor:
    """Batch mean of D_sym(a, b) for the task's outputs (sst logits [B, 5], para logit [B], sts score [B];
    `regression`: the para output is a number (a cosine, a 0/1 regression), compared by squared error).

    Symmetric KL, KL(p||q) + KL(q||p) = sum_k (p_k - q_k)(log p_k - log q_k); for a Bernoulli
    with logits a, b that is (sigmoid(a) - sigmoid(b)) (a - b).
    """
    a, b = a.float(), b.float()
    if task == "sst":
        log_p, log_q = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()
    if task == "para" and not regression:
        return ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)).mean()
    if task in ("para", "sts"):
        return ((a - b) ** 2).mean()
    raise ValueError(f"symmetric_divergence: unknown task {task!r}")


# ---------------------------------------------------------------- helpers


class _EmbeddingPerturbation:
    """Adds a perturbation to the word-embedding output of every encoder of the model.

    A pair task calls an encoder twice (u, then v), so the k-th embedding call of a forward
    pass gets the k-th delta. The first pass draws each delta (noise_std * N(0, 1)); later passes
    reuse them.
    """

    def __init__(self, model: nn.Module, noise_std: float, generator: torch.Generator):
        encoders = model.encoders() if hasattr(model, "encoders") else [model.encoder]
        # dict: one hook per module even if an encoder is listed once per task
        self.modules = list({id(e): e.embeddings.word_embeddings for e in encoders}.values())
        self.deltas: list[Tensor] = []
        self.noise_std, self.generator = noise_std, generator
        self._calls = 0

    def forward(self, model, task, batch, device, rng_state) -> Tensor:
        self._calls = 0
        output = _forward(model, task, batch, device, rng_state)
        if self._calls != len(self.deltas):
            raise RuntimeError(f"SMART: {self._calls} word-embedding calls in this pass, {len(self.deltas)} in the first")
        return output

    @contextmanager
    def active(self):
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module, inputs, output):
        k = self._calls
        self._calls += 1
        if k == len(self.deltas):  # first pass: draw this call's delta
            noise = torch.randn(output.shape, generator=self.generator, device=output.device, dtype=torch.float32)
            delta = (noise * self.noise_std).requires_grad_(True)
            self.deltas.append(delta)
        return output + self.deltas[k].to(output.dtype)


def _regression(model, task: str) -> bool:
    return bool(getattr(model, "regression_output", lambda _task: False)(task))


def _forward(model, task, batch, device, rng_state):
    """model(task, batch) in fp32 (finetune trains SMART in fp32: bf16 rounding is larger than a
    perturbation of train.smart.epsilon), with the random state of the clean pass when given."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if rng_state is not None:
            cpu_state, cuda_state = rng_state
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
        return model(task, batch)


def _ascend(delta: Tensor, grad: Tensor | None, step_size: float, epsilon: float) -> Tensor:
    """One normalised ascent step, then back into the inf-norm ball; detached (a constant from here)."""
    if grad is None:
        grad = torch.zeros_like(delta)
    direction = grad / (grad.abs().amax(dim=-1, keepdim=True) + _GRAD_NORM_FLOOR)
    return (delta.detach() + step_size * direction).clamp(-epsilon, epsilon)
