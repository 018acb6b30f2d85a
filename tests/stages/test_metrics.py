import math

import numpy as np
import pytest

from stages.metrics import accuracy, dev_metrics, overall, pearson


def test_accuracy_hand_case():
    assert accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    # para: int predictions against float32 0/1 labels
    assert accuracy(np.array([1, 0, 1]), np.array([1.0, 1.0, 1.0], dtype=np.float32)) == pytest.approx(2 / 3)


def test_accuracy_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 predictions for 2"):
        accuracy([1, 2, 3], [1, 2])


def test_pearson_hand_case():
    # x = [1, 2, 3], y = [1, 3, 2]: dx = [-1, 0, 1], dy = [-1, 1, 0]
    # sum dx*dy = 1, sum dx^2 = 2, sum dy^2 = 2 -> r = 1 / 2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([0.0, 1.0], [2.0, 5.0]) == pytest.approx(1.0)


def test_pearson_constant_side_is_zero_with_a_warning_not_nan():
    with pytest.warns(UserWarning, match="predictions are constant"):
        r = pearson([2.5, 2.5, 2.5], [1.0, 2.0, 4.0])
    assert r == 0.0 and not math.isnan(r)
    with pytest.warns(UserWarning, match="gold scores are constant"):
        assert pearson([1.0, 2.0, 4.0], [3.0, 3.0, 3.0]) == 0.0


def test_overall_formula():
    # (0.5 + 0.75 + (0.2 + 1) / 2) / 3 = (0.5 + 0.75 + 0.6) / 3
    assert overall(0.5, 0.75, 0.2) == pytest.approx(1.85 / 3)
    assert overall(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert overall(0.0, 0.0, -1.0) == pytest.approx(0.0)


def test_dev_metrics_all_tasks():
    preds = {"sst": np.array([0, 1, 2, 3]), "para": np.array([1, 0]), "sts": np.array([1.0, 2.0, 3.0])}
    golds = {"sst": np.array([0, 1, 0, 0]), "para": np.array([1.0, 0.0]), "sts": np.array([1.0, 3.0, 2.0])}
    m = dev_metrics(preds, golds)
    assert m == pytest.approx({"dev/sst_acc": 0.5, "dev/para_acc": 1.0, "dev/sts_corr": 0.5,
                               "dev/overall": (0.5 + 1.0 + 0.75) / 3})


def test_dev_metrics_without_all_tasks_has_no_overall():
    m = dev_metrics({"sst": np.array([1, 1])}, {"sst": np.array([1, 0]), "sts": np.array([1.0, 2.0])})
    assert m == {"dev/sst_acc": 0.5}


def test_dev_metrics_rejects_unknown_task_and_missing_gold():
    with pytest.raises(KeyError, match="nli"):
        dev_metrics({"nli": np.array([1])}, {"nli": np.array([1])})
    with pytest.raises(KeyError, match="para"):
        dev_metrics({"para": np.array([1])}, {})
