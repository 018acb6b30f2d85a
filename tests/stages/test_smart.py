import math
from dataclasses import replace

import pytest
import torch

from pipeline.config import SmartConfig
from stages import smart
from stages.encoder import load_bert
from stages.multitask_model import MultitaskModel




@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    # dropout 0.1 and train mode on purpose: the extra passes must replay the clean pass's masks
    return MultitaskModel(load_bert(tiny_model_dir, dropout=0.1), "cls", 0.1).train()


def _batch(task, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda: torch.randint(1000, 5000, (4, 7), generator=g)
    ones = torch.ones(4, 7, dtype=torch.long)
    labels = {"sst": torch.tensor([0, 1, 3, 4]), "para": torch.tensor([0.0, 1.0, 1.0, 0.0]),
              "sts": torch.tensor([0.5, 2.0, 4.5, 3.0])}[task]
    if task == "sst":
        return {"input_ids": ids(), "attention_mask": ones, "labels": labels}
    return {"input_ids_1": ids(), "attention_mask_1": ones, "input_ids_2": ids(), "attention_mask_2": ones,
            "labels": labels}


def _adversarial(model, task, cfg, seed=0):
    batch = _batch(task)
    torch.manual_seed(seed)
    rng_state = smart.capture_rng(torch.device("cpu"))
    clean = model(task, batch)
    return smart.smart_adversarial_loss(model, task, batch, clean, cfg, rng_state), clean


def test_symmetric_kl_on_hand_distributions():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) + KL(q||p) = sum (p - q)(ln p - ln q)
    #   = 1/4 ln 2 - 1/4 ln(2/3) = 1/4 ln 3
    p_logits = torch.log(torch.tensor([[0.5, 0.5]]))
    q_logits = torch.log(torch.tensor([[0.25, 0.75]]))
    assert smart.symmetric_divergence("sst", p_logits, q_logits).item() == pytest.approx(0.25 * math.log(3))
    # the same two distributions as Bernoulli logits: sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4
    assert smart.symmetric_divergence("para", torch.tensor([0.0]), torch.tensor([math.log(3)])).item() == \
        pytest.approx(0.25 * math.log(3))
    # batch mean: a second row with identical distributions halves it
    two = smart.symmetric_divergence("sst", torch.cat([p_logits, p_logits]), torch.cat([q_logits, p_logits]))
    assert two.item() == pytest.approx(0.125 * math.log(3))
    # symmetric, and equal to torch's KL both ways
    kl = lambda a, b: torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                                 reduction="batchmean")
    a, b = torch.tensor([[0.3, -1.0, 2.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, -0.5, 0.2, 0.1]])
    assert smart.symmetric_divergence("sst", a, b).item() == pytest.approx((kl(a, b) + kl(b, a)).item(), rel=1e-5)
    assert smart.symmetric_divergence("sst", b, a).item() == pytest.approx(smart.symmetric_divergence("sst", a, b).item())
    # sts: mean squared error, (1 + 4) / 2
    assert smart.symmetric_divergence("sts", torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])).item() == 2.5


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_adversarial_term_is_zero_without_perturbation(model, task):
    cfg = SmartConfig(enabled=True, weight=1.0, noise_std=0.0, step_size=1e-3, epsilon=1e-5)
    loss, _ = _adversarial(model, task, cfg)
    assert loss.item() == 0.0  # same dropout masks, zero delta: f(x + 0) is f(x) exactly


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_adversarial_term_grows_with_epsilon(model, task):
    base = SmartConfig(enabled=True, weight=1.0, noise_std=1e-3, step_size=1.0)
    values = [_adversarial(model, task, replace(base, epsilon=eps))[0].item() for eps in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert 0 < values[0] < values[1] < values[2] < values[3], values
    # weight scales the term linearly
    doubled = _adversarial(model, task, replace(base, epsilon=1e-2, weight=2.0))[0].item()
    assert doubled == pytest.approx(2 * values[2], rel=1e-5)


def test_adversarial_term_reaches_the_encoder_weights(model):
    model.zero_grad(set_to_none=True)
    loss, _ = _adversarial(model, "sst", SmartConfig(enabled=True, noise_std=1e-3, step_size=1.0, epsilon=1e-1))
    loss.backward()
    grad = model.encoder.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_proximal_term_zero_when_copy_equals_model_and_update_is_momentum(model):
    cfg = SmartConfig(enabled=True, proximal_weight=1.0, proximal_beta=0.5)
    proximal = smart.make_proximal_copy(model)
    batch = _batch("sst")
    torch.manual_seed(1)
    rng_state = smart.capture_rng(torch.device("cpu"))
    clean = model("sst", batch)
    assert smart.proximal_loss(proximal, "sst", batch, clean, cfg, rng_state).item() == 0.0

    head, head_tilde = model.heads["sst"].weight, proximal.heads["sst"].weight
    before = head.detach().clone()
    with torch.no_grad():
        head.add_(1.0)
    clean = model("sst", batch)
    moved = smart.proximal_loss(proximal, "sst", batch, clean, cfg, rng_state)
    assert moved.item() > 0
    assert smart.proximal_loss(proximal, "sst", batch, clean, replace(cfg, proximal_weight=0.0), rng_state).item() == 0.0
    # theta_tilde <- 0.5 theta_tilde + 0.5 theta: half way, (before) + 0.5
    smart.update_proximal(proximal, model, beta=0.5)
    assert torch.allclose(head_tilde, before + 0.5)
    smart.update_proximal(proximal, model, beta=0.0)
    assert torch.equal(head_tilde, head.detach())
    with torch.no_grad():
        head.sub_(1.0)


def test_a_cosine_or_0_1_regression_para_output_is_compared_by_squared_error():
    a, b = torch.tensor([0.5, -0.5]), torch.tensor([0.0, 0.5])
    assert smart.symmetric_divergence("para", a, b, regression=True).item() == pytest.approx((0.25 + 1.0) / 2)


def test_adversarial_passes_leave_batchnorm_statistics_alone(tiny_model_dir):
    deep = MultitaskModel(load_bert(tiny_model_dir, dropout=0.1), "cls", 0.1, head_layers=3).train()
    batch = _batch("sst")
    rng_state = smart.capture_rng(torch.device("cpu"))
    clean = deep("sst", batch)  # the training step's own pass moves the statistics once
    before = {n: b.clone() for n, b in deep.named_buffers()}
    assert any("running_mean" in n for n in before)
    cfg = SmartConfig(enabled=True, noise_std=1e-3, step_size=1.0, epsilon=1e-1)
    adversarial = smart.smart_adversarial_loss(deep, "sst", batch, clean, cfg, rng_state)
    assert adversarial.item() > 0
    after = dict(deep.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    # The training step's backward still runs: the clean pass's graph holds those statistics.
    (deep.loss("sst", clean, batch["labels"]) + adversarial).backward()
    assert deep.heads["sst"][0].weight.grad is not None
