import numpy as np
import pytest
import torch

from stages.pcgrad import pcgrad_backward, project_conflicting


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_two_conflicting_gradients_hand_values():
    # g1 . g2 = -1 < 0.  g1' = g1 - (-1/1) g2 = (1, 0);  g2' = g2 - (-1/2) g1 = (0.5, -0.5)
    g1, g2 = t(1.0, 1.0), t(0.0, -1.0)
    out = project_conflicting([g1, g2], np.random.default_rng(0))
    assert out.tolist() == pytest.approx([1.5, -0.5])


def test_three_tasks_hand_values_and_order():
    g1, g2, g3 = t(1.0, 0.0), t(-1.0, 1.0), t(0.0, 1.0)
    # g1 conflicts with g2 only: g1' = g1 - (-1/2) g2 = (0.5, 0.5); then g1' . g3 = 0.5 >= 0.
    # Order g3, g2 gives the same: g1 . g3 = 0, then g2 as above.
    # g2 conflicts with g1 only: g2' = g2 - (-1/1) g1 = (0, 1); g2' . g3 = 1 >= 0.
    # g3 conflicts with neither.
    for seed in range(4):
        out = project_conflicting([g1, g2, g3], np.random.default_rng(seed))
        assert out.tolist() == pytest.approx([0.5, 2.5])


def test_projection_order_matters_and_is_random():
    # g1 conflicts with both others; the second projection sees the first's result.
    g1, g2, g3 = t(1.0, 0.0), t(-1.0, 1.0), t(-1.0, -1.0)
    # first g2: (1,0) + 0.5 (-1,1) = (0.5, 0.5); then . g3 = -1 -> + 0.5 (-1,-1) = (0, 0)
    # first g3: (1,0) + 0.5 (-1,-1) = (0.5, -0.5); then . g2 = -1 -> + 0.5 (-1,1) = (0, 0)
    # g2: . g1 = -1 -> (0, 1); . g3 = -1 -> (0,1) + 0.5 (-1,-1) = (-0.5, 0.5);
    #     order g3 first: g2 . g3 = 0, then . g1 = -1 -> (0, 1); then done -> (0, 1)
    # g3: . g1 = -1 -> (0, -1); . g2 = -1 -> (0,-1) + 0.5 (-1,1) = (-0.5, -0.5);
    #     order g2 first: g3 . g2 = 0, then . g1 = -1 -> (0, -1)
    results = {tuple(np.round(project_conflicting([g1, g2, g3], np.random.default_rng(s)).tolist(), 6))
               for s in range(30)}
    possible = {(a2 + a3, b2 + b3) for a2, b2 in [(-0.5, 0.5), (0.0, 1.0)] for a3, b3 in [(-0.5, -0.5), (0.0, -1.0)]}
    assert results <= possible and len(results) > 1


def test_non_conflicting_gradients_pass_unchanged():
    grads = [t(1.0, 2.0, 0.0), t(0.5, 0.0, 1.0), t(0.0, 3.0, 1.0)]  # pairwise dots 0.5, 6, 1
    out = project_conflicting(grads, np.random.default_rng(0))
    assert out.tolist() == pytest.approx((grads[0] + grads[1] + grads[2]).tolist())


def test_projected_gradient_is_orthogonal_to_the_conflicting_one():
    g1, g2 = t(3.0, -1.0, 2.0), t(-1.0, 2.0, 0.5)
    assert torch.dot(g1, g2) < 0
    total = project_conflicting([g1, g2], np.random.default_rng(0))
    g1_projected = g1 - torch.dot(g1, g2) / torch.dot(g2, g2) * g2
    assert torch.dot(g1_projected, g2).item() == pytest.approx(0.0, abs=1e-6)
    g2_projected = g2 - torch.dot(g2, g1) / torch.dot(g1, g1) * g1
    assert torch.dot(g2_projected, g1).item() == pytest.approx(0.0, abs=1e-6)
    assert total.tolist() == pytest.approx((g1_projected + g2_projected).tolist(), abs=1e-6)


def test_single_task_and_bad_shapes():
    assert project_conflicting([t(1.0, -2.0)], np.random.default_rng(0)).tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="one length"):
        project_conflicting([t(1.0), t(1.0, 2.0)], np.random.default_rng(0))


def test_backward_projects_shared_parameters_and_keeps_task_specific_ones():
    shared = torch.nn.Parameter(torch.zeros(2))
    head_a, head_b = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(3.0))
    # d loss_a / d shared = (1, 1); d loss_b / d shared = (0, -1): the hand pair above.
    loss_a = shared[0] + shared[1] + 5 * head_a
    loss_b = -shared[1] + head_b ** 2
    pcgrad_backward({"a": loss_a, "b": loss_b}, [shared, head_a, head_b], np.random.default_rng(0))
    assert shared.grad.tolist() == pytest.approx([1.5, -0.5])
    assert head_a.grad.item() == pytest.approx(5.0)
    assert head_b.grad.item() == pytest.approx(6.0)
