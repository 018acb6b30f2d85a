"""evaluate: the starter's exact prediction files, the submission zip, and dev metrics that
agree with a hand computation from the written files."""

import re
import zipfile

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import evaluate
from stages.batches import load_split, pad_batch
from stages.encoder import load_bert
from stages.multitask_model import MultitaskModel, load_multitask, predict, save_multitask

HEADERS = {"sst": b"id \t Predicted_Sentiment \n",
           "para": b"id \t Predicted_Is_Paraphrase \n",
           "sts": b"id \t Predicted_Similiary \n"}
VALUE = {"sst": rb"[0-4]", "para": rb"(0\.0|1\.0)", "sts": rb"[0-5]\.[0-9]{4}"}




@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir, prepared):
    """A finetune output folder: the tiny encoder with heads set so predictions vary.

    A random encoder's sentence vectors share a large common part; each head's bias cancels
    it (bias = -W @ mean vector), so the sentence-specific part decides the prediction.
    """
    torch.manual_seed(0)
    model = MultitaskModel(load_bert(tiny_model_dir), pooling="mean").eval()
    split = load_split(prepared / "sst-dev.arrow")
    input_ids, attention_mask = pad_batch(split, "input_ids", np.arange(len(split)))
    with torch.no_grad():
        mean_vector = model.embed(input_ids, attention_mask).mean(0)
        for task, head in model.heads.items():
            head.weight.normal_(std=0.5 if task == "sts" else 3.0)
            centre = mean_vector if task == "sst" else torch.cat([mean_vector, mean_vector])
            head.bias.copy_(-head.weight @ centre + (2.5 if task == "sts" else 0.0))
    out = tmp_path_factory.mktemp("finetune")
    save_multitask(model, out / "model", tokenizer_from=tiny_model_dir)
    return out


@pytest.fixture(scope="module")
def evaluated(prepared, finetuned, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    logged = []
    cfg = _cfg(prepared, tiny_model_dir, **{"train.eval_batch_size": 7})  # several, uneven batches
    result = evaluate.run(cfg, {"data_prep": prepared, "finetune": finetuned}, out,
                          lambda m, step=None: logged.append((m, step)))
    return out, result, logged


def _cfg(data_dir, model_dir, **overrides):
    return apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(data_dir), "model.dir": str(model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop", **overrides})


def _read_rows(path):
    """[(id, value bytes)] after checking every line's exact form."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line, the last included, ends in "\n"
    return [re.fullmatch(rb"(\S+) , (\S+) ", line).groups() for line in lines[1:-1]]


WRITTEN = ["sst-dev", "sst-test", "para-dev", "sts-dev", "sts-test"]


@pytest.mark.parametrize("name", WRITTEN)
def test_prediction_files_have_the_starters_exact_form(evaluated, prepared, name):
    out, _, _ = evaluated
    task = name.split("-")[0]
    path = out / "predictions" / f"{name}-output.csv"
    data = path.read_bytes()
    assert data.startswith(HEADERS[task])
    assert b"\r" not in data
    split = load_split(prepared / f"{name}.arrow")
    body = data[len(HEADERS[task]):].split(b"\n")[:-1]
    assert len(body) == len(split) == 48
    for line, expected_id in zip(body, split.ids):
        assert re.fullmatch(rb"[0-9a-f]+ , " + VALUE[task] + rb" ", line), line
        assert line.split(b" , ")[0].decode() == expected_id  # the split's original order
    assert len({line.split(b" , ")[0] for line in body}) == len(body)  # each id once


def test_rows_pair_each_id_with_its_own_prediction(evaluated, prepared, finetuned):
    # Predictions made here, one row at a time, must match the file row for row: catches a
    # batch-order permutation written against the wrong ids.
    out, _, _ = evaluated
    model = load_multitask(finetuned / "model")
    for name in WRITTEN:
        task = name.split("-")[0]
        split = load_split(prepared / f"{name}.arrow")
        expected = predict(model, task, split, batch_size=1, device="cpu")
        rows = _read_rows(out / "predictions" / f"{name}-output.csv")
        if task == "sts":
            np.testing.assert_allclose([float(v) for _, v in rows], expected, atol=6e-5)
        else:
            assert [float(v) for _, v in rows] == [float(x) for x in expected]
    # The fixture's heads give non-constant predictions, so the checks above say something.
    for name in ("sst-dev", "para-dev", "sts-dev"):
        assert len({v for _, v in _read_rows(out / "predictions" / f"{name}-output.csv")}) > 1


def test_missing_quora_test_is_reported_not_written(evaluated, capsys):
    out, result, _ = evaluated
    assert result["missing_test_files"] == ["para-test-output.csv"]
    assert not (out / "predictions" / "para-test-output.csv").exists()
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(f"{n}-output.csv" for n in WRITTEN)


def test_prints_one_line_of_missing_files_and_one_of_dev_metrics(prepared, finetuned, tiny_model_dir, tmp_path,
                                                                capsys):
    logged = []
    evaluate.run(_cfg(prepared, tiny_model_dir), {"data_prep": prepared, "finetune": finetuned}, tmp_path,
                 lambda m, step=None: logged.append(m))
    metrics = logged[0]
    assert capsys.readouterr().out.splitlines() == [
        f"evaluate: not written, no such split in {prepared / 'manifest.json'}: para-test-output.csv",
        f"evaluate: dev/sst_acc {metrics['dev/sst_acc']:.4f}, dev/para_acc {metrics['dev/para_acc']:.4f}, "
        f"dev/sts_corr {metrics['dev/sts_corr']:.4f}, dev/overall {metrics['dev/overall']:.4f}"]


def test_submission_zip_holds_the_prediction_files(evaluated):
    out, result, _ = evaluated
    assert result["submission"] == str(out / "submission.zip")
    assert result["predictions"] == str(out / "predictions")
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"predictions/{n}-output.csv" for n in WRITTEN)
        for name in WRITTEN:
            assert zf.read(f"predictions/{name}-output.csv") == (out / "predictions" / f"{name}-output.csv").read_bytes()


def test_dev_metrics_equal_a_hand_computation_from_the_files(evaluated, prepared):
    out, result, logged = evaluated
    gold = {}
    for task in ("sst", "para", "sts"):
        split = load_split(prepared / f"{task}-dev.arrow")
        gold[task] = dict(zip(split.ids, split.labels.tolist()))
    rows = {task: _read_rows(out / "predictions" / f"{task}-dev-output.csv") for task in gold}

    sst_acc = np.mean([int(v) == gold["sst"][i.decode()] for i, v in rows["sst"]])
    para_acc = np.mean([float(v) == gold["para"][i.decode()] for i, v in rows["para"]])
    sts_pred = np.array([float(v) for _, v in rows["sts"]])
    sts_gold = np.array([gold["sts"][i.decode()] for i, _ in rows["sts"]])
    sts_corr = np.corrcoef(sts_pred, sts_gold)[0, 1]

    metrics = result["metrics"]
    assert metrics["dev/sst_acc"] == pytest.approx(sst_acc, abs=1e-12)
    assert metrics["dev/para_acc"] == pytest.approx(para_acc, abs=1e-12)
    assert metrics["dev/sts_corr"] == pytest.approx(sts_corr, abs=1e-4)  # files carry 4 decimals
    assert metrics["dev/overall"] == pytest.approx((sst_acc + para_acc + (sts_corr + 1) / 2) / 3, abs=1e-4)
    assert logged == [(metrics, None)]  # logged once


def test_format_prediction_by_hand():
    assert evaluate.format_prediction("sst", np.int64(3)) == "3"
    assert evaluate.format_prediction("para", np.int64(1)) == "1.0"
    assert evaluate.format_prediction("para", 0) == "0.0"
    assert evaluate.format_prediction("sts", np.float32(2.345678)) == "2.3457"
    assert evaluate.format_prediction("sts", 5.0) == "5.0000"
    with pytest.raises(KeyError):
        evaluate.format_prediction("nli", 1)


def test_missing_finetune_model_is_a_clear_error(prepared, tiny_model_dir, tmp_path):
    cfg = _cfg(prepared, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model")):
        evaluate.run(cfg, {"data_prep": prepared, "finetune": tmp_path}, tmp_path / "out", lambda *a, **k: None)
