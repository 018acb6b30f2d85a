"""reference: the untrained backbone's scores, checked against hand-computed values on tiny inputs."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import reference
from stages.batches import load_split
from stages.encoder import load_bert
from stages.metrics import overall


def test_sts_score_is_the_pearson_of_the_cosines():
    # cos = 1, 0, 1/sqrt(2) (lengths differ on purpose: only the angle counts); gold 5, 1, 3.
    # x = (1, 0, s), s = 1/sqrt(2): sum (x - mean)^2 = 1 + s^2 - (1 + s)^2 / 3 = 1 - sqrt(2)/3,
    # gold deviations (2, -2, 0): covariance sum 2 (1 - 0) = 2, sum of squares 8, so
    # r = 2 / sqrt(8 (1 - sqrt(2)/3)) = 1 / sqrt(2 - 2 sqrt(2)/3) = 0.97258...
    u = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    expected = 1 / math.sqrt(2 - 2 * math.sqrt(2) / 3)
    assert reference.cosine_pearson(u, v, np.array([5.0, 1.0, 3.0])) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.97258, abs=1e-5)


def test_majority_class_accuracy_by_hand():
    # train: label 1 three times, 0 twice, 2 once -> always 1; dev has it 3 times out of 4
    assert reference.majority_accuracy([0, 1, 1, 2, 1, 0], [1, 0, 1, 1]) == 0.75
    # a tie (0 and 1 twice each) goes to the smaller label
    assert reference.majority_accuracy([1, 0, 1, 0], [0, 0, 1]) == pytest.approx(2 / 3)


def test_pair_features_are_u_v_absdiff_product():
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    assert reference.pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 1.0, 2.0, 3.0, 3.0, -2.0]]


def test_probe_recovers_a_linearly_separable_problem():
    # Three classes in the plane, each a cluster around its own corner; a feature of pure noise
    # and one constant feature (standardising it must not give NaN).
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + 0.5 * torch.randn(len(y), 2, generator=gen)
    x = torch.cat([x, torch.randn(len(y), 1, generator=gen), torch.full((len(y), 1), 7.0)], dim=1)
    probe = reference.fit_probe(x, y, classes=3)
    assert (reference.probe_predict(probe, x) == y.numpy()).all()
    # Points it never saw, one at each corner, and it is deterministic: the same fit twice.
    fresh = torch.tensor([[3.5, 0.2, 0.0, 7.0], [-3.5, -0.3, 1.0, 7.0], [0.1, 3.8, -1.0, 7.0]])
    assert reference.probe_predict(probe, fresh).tolist() == [0, 1, 2]
    again = reference.fit_probe(x, y, classes=3)
    assert torch.equal(again["weight"], probe["weight"]) and torch.equal(again["bias"], probe["bias"])


def test_embed_is_each_sentence_mean_pooled_alone(tiny_model_dir, prepared):
    """Length-sorted, padded batches give every row the vector it has when encoded by itself."""
    encoder = load_bert(tiny_model_dir)
    split = load_split(prepared / "sst-dev.arrow")
    batched = reference.embed(encoder, split, "input_ids", 8, "cpu")
    values, offsets = split.columns["input_ids"]
    for i in (0, 5, len(split) - 1):
        ids = torch.from_numpy(values[offsets[i]:offsets[i + 1]].astype(np.int64))[None]
        with torch.no_grad():
            alone = encoder(ids, torch.ones_like(ids)).mean(1)[0]
        assert torch.allclose(batched[i], alone, atol=1e-5)


def test_run_logs_the_comparison_metric_names(tiny_model_dir, prepared, tmp_path):
    cfg = apply_overrides(PipelineConfig(), {"device": "cpu", "model.dir": str(tiny_model_dir),
                                             "train.eval_batch_size": 16})
    logged = []
    result = reference.run(cfg, {"data_prep": prepared}, tmp_path, lambda metrics, step=None: logged.append(metrics))
    m = result["metrics"]
    assert logged == [m]
    assert set(m) == {"dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall",
                      "reference/sst_majority", "reference/para_majority"}
    assert m["dev/overall"] == pytest.approx(overall(m["dev/sst_acc"], m["dev/para_acc"], m["dev/sts_corr"]))
    sst_dev = load_split(prepared / "sst-dev.arrow")
    sst_train = load_split(prepared / "sst-train.arrow")
    assert m["reference/sst_majority"] == reference.majority_accuracy(sst_train.labels, sst_dev.labels)
    assert all(0 <= m[k] <= 1 for k in m if k != "dev/sts_corr") and -1 <= m["dev/sts_corr"] <= 1


def test_extra_sets_are_scored_like_the_dev_split_of_their_task(tiny_model_dir, prepared, tmp_path):
    """The dev splits listed again as extra sets: the same numbers under eval/<name>/...; a task
    without a probe (no para-train here) leaves its set out."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["extra_eval"] = {"sts_again": {"task": "sts", "file": "sts-dev.arrow"},
                              "sst_again": {"task": "sst", "file": "sst-dev.arrow"},
                              "para_again": {"task": "para", "file": "para-dev.arrow"}}
    del manifest["splits"]["para-train"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = apply_overrides(PipelineConfig(), {"device": "cpu", "model.dir": str(tiny_model_dir),
                                             "train.eval_batch_size": 16})
    m = reference.run(cfg, {"data_prep": data}, tmp_path / "out", lambda metrics, step=None: None)["metrics"]
    assert m["eval/sts_again/pearson"] == pytest.approx(m["dev/sts_corr"], abs=1e-6)
    assert m["eval/sst_again/accuracy"] == m["dev/sst_acc"]
    assert "eval/sst_again/macro_f1" in m and "eval/sts_again/spearman" in m
    assert not any(k.startswith("eval/para_again/") for k in m) and "dev/para_acc" not in m
