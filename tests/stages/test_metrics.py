import math

import numpy as np
import pytest

from stages.metrics import (accuracy, analysis_metrics, binary_precision_recall_f1, confusion_matrix, dev_metrics,
                            extra_eval_metrics, overall, pearson, per_class_f1, ranks, spearman)


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


def test_confusion_matrix_and_per_class_f1_hand_case():
    # gold 0 0 1 1 2, predicted 0 1 1 1 0: class 0 has 1 hit of 2 predicted, 2 gold -> P 1/2, R 1/2,
    # F1 1/2; class 1: 2 hits of 3 predicted, 2 gold -> P 2/3, R 1, F1 2 (2/3)(1) / (5/3) = 4/5;
    # class 2 never predicted, once gold -> P 0, R 0, F1 0.
    counts = confusion_matrix([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    precision, recall, f1 = per_class_f1(counts)
    assert precision == pytest.approx([0.5, 2 / 3, 0.0])
    assert recall == pytest.approx([0.5, 1.0, 0.0])
    assert f1 == pytest.approx([0.5, 0.8, 0.0])


def test_binary_precision_recall_f1_hand_case():
    # predicted 1 1 1 0 0 against gold 1 0 1 1 0: TP 2, FP 1, FN 1 -> P 2/3, R 2/3, F1 2/3
    assert binary_precision_recall_f1([1, 1, 1, 0, 0], np.array([1.0, 0.0, 1.0, 1.0, 0.0])) == pytest.approx(
        (2 / 3, 2 / 3, 2 / 3))
    assert binary_precision_recall_f1([0, 0], [0.0, 1.0]) == (0.0, 0.0, 0.0)  # nothing predicted positive


def test_spearman_hand_case_with_ties():
    assert ranks([10, 20, 20, 30]).tolist() == [0, 1.5, 1.5, 3]
    # A monotone but non-linear relation: Spearman 1, Pearson below 1.
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): centred (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5):
    # sum of products 4.5, squares 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_analysis_metrics_names_and_values():
    m = analysis_metrics({"sst": np.array([0, 1, 1, 1, 0]), "para": np.array([1, 1, 1, 0, 0]),
                          "sts": np.array([1.0, 2.0, 3.0, 4.0])},
                         {"sst": np.array([0, 0, 1, 1, 2]), "para": np.array([1.0, 0.0, 1.0, 1.0, 0.0]),
                          "sts": np.array([1.0, 4.0, 9.0, 100.0])})
    assert m == pytest.approx({"dev/sst_f1_0": 0.5, "dev/sst_f1_1": 0.8, "dev/sst_f1_2": 0.0, "dev/sst_f1_3": 0.0,
                               "dev/sst_f1_4": 0.0, "dev/sst_macro_f1": 1.3 / 5, "dev/para_precision": 2 / 3,
                               "dev/para_recall": 2 / 3, "dev/para_f1": 2 / 3, "dev/sts_spearman": 1.0})


def test_extra_eval_metrics_are_named_by_the_set_and_scored_by_its_task():
    # sst: 3 of 4 right
    sst = extra_eval_metrics("reviews", "sst", [0, 1, 1, 2], [0, 1, 1, 1])
    assert sst["eval/reviews/accuracy"] == 0.75
    # class 0: F1 1; class 1: precision 1, recall 2/3, F1 0.8; class 2: predicted once, never gold, F1 0
    assert sst["eval/reviews/macro_f1"] == pytest.approx((1 + 0.8) / 5)
    para = extra_eval_metrics("mrpc", "para", np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1], dtype=np.float32))
    assert para == {"eval/mrpc/accuracy": 0.5, "eval/mrpc/f1": pytest.approx(0.5)}
    sts = extra_eval_metrics("sick", "sts", [0.0, 1.0, 3.0], [0.0, 2.5, 5.0])
    assert set(sts) == {"eval/sick/pearson", "eval/sick/spearman"}
    assert sts["eval/sick/pearson"] == pytest.approx(np.corrcoef([0, 1, 3], [0, 2.5, 5])[0, 1])
    assert sts["eval/sick/spearman"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="unknown task 'nli'"):
        extra_eval_metrics("x", "nli", [1], [1])

