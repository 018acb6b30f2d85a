"""The paired bootstrap against cases whose every resample is known by hand."""

import numpy as np
import pytest

from pipeline.bootstrap import (excludes_zero, interval, pearson_rows, resampled_differences,
                                resampled_scores)


def test_two_examples_one_more_right_gives_the_binomial_of_the_second():
    # Gold (0, 1); the baseline gets example 0 right only, the variant both. On a resample the
    # difference is the share of draws of example 1: 0, 1/2 or 1 with chances 1/4, 1/2, 1/4.
    scores = resampled_scores({"sst": np.array([0, 1])}, {"sst": [np.array([0, 0]), np.array([0, 1])]})
    diffs = resampled_differences(scores["dev/sst_acc"][0], scores["dev/sst_acc"][1])
    assert set(np.round(diffs, 9)) == {0.0, 0.5, 1.0}
    shares = [np.mean(diffs == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.05)
    assert interval(diffs) == (0.0, 1.0) and not excludes_zero(interval(diffs))


def test_identical_or_rescaled_predictions_differ_by_zero_on_every_resample():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 40)
    base = gold + rng.normal(0, 1, 40)
    scores = resampled_scores({"sts": gold}, {"sts": [base, base, 0.5 * base + 1.0]})
    corr = scores["dev/sts_corr"]
    assert corr.shape == (3, 1000)
    assert np.array_equal(corr[0], corr[1])
    # Pearson ignores a positive linear rescaling: the same score on each resample, up to rounding.
    ci = interval(resampled_differences(corr[0], corr[2]))
    assert ci == pytest.approx((0.0, 0.0), abs=1e-12) and not excludes_zero(ci)


def test_a_better_model_on_every_example_excludes_zero_and_overall_weighs_each_task_a_third():
    # The variant is right on every sst and para example and the baseline on none; on sts the
    # variant predicts the gold (r = 1 on every resample) and the baseline its mirror (r = -1).
    # Each resample: sst +1, para +1, sts +2, so overall (1 + 1 + 2 / 2) / 3 = +1.
    gold_sst, gold_para, gold_sts = np.array([0, 1, 2, 3, 4]), np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.5, 5.0])
    scores = resampled_scores(
        {"sst": gold_sst, "para": gold_para, "sts": gold_sts},
        {"sst": [(gold_sst + 1) % 5, gold_sst], "para": [1 - gold_para, gold_para], "sts": [5 - gold_sts, gold_sts]})
    for metric, expected in (("dev/sst_acc", 1.0), ("dev/para_acc", 1.0), ("dev/overall", 1.0)):
        ci = interval(resampled_differences(scores[metric][0], scores[metric][1]))
        assert ci == pytest.approx((expected, expected)) and excludes_zero(ci)
    # A resample that draws one sts example only has constant gold: r is 0 there, for both.
    sts = resampled_differences(scores["dev/sts_corr"][0], scores["dev/sts_corr"][1])
    assert set(np.round(sts, 9)) <= {0.0, 2.0} and np.mean(sts == 2.0) > 0.95


def test_seeds_are_resampled_too():
    # Seed 1: the variant wins by 1 on every resample; seed 2: no difference. Drawing two seeds
    # with replacement gives (1+1)/2, (1+0)/2, (0+1)/2 or (0+0)/2: 1, 1/2, 1/2, 0.
    base = np.zeros((2, 1000))
    variant = np.vstack([np.ones(1000), np.zeros(1000)])
    diffs = resampled_differences(base, variant)
    shares = [np.mean(diffs == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.05)
    assert interval(diffs) == (0.0, 1.0)


def test_the_same_seed_gives_the_same_intervals_and_a_constant_row_scores_zero():
    gold = {"sst": np.arange(30) % 5}
    preds = {"sst": [np.arange(30) % 3, np.arange(30) % 5]}
    assert np.array_equal(resampled_scores(gold, preds)["dev/sst_acc"], resampled_scores(gold, preds)["dev/sst_acc"])
    assert pearson_rows(np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])) \
        == pytest.approx([0.0, -1.0])
