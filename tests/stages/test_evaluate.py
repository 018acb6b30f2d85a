"""evaluate: the starter's exact prediction files, the submission zip, and dev metrics that
agree with a hand computation from the written files."""

import csv
import json
import re
import zipfile

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import evaluate
from stages.batches import load_split, pad_batch
from stages.encoder import load_bert
from stages.multitask_model import MultitaskModel, load_multitask, predict, predict_with_scores, save_multitask

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
    # Several, uneven batches; fp32, since the tests below recompute predictions one row at a time
    # and bf16 rounding depends on a batch's padding (bf16: test_evaluate_in_bf16_writes_the_bf16_predictions_of_its_own_batches).
    cfg = _cfg(prepared, tiny_model_dir, **{"train.eval_batch_size": 7, "precision": "fp32"})
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


def test_evaluate_in_bf16_writes_the_bf16_predictions_of_its_own_batches(prepared, finetuned, tiny_model_dir,
                                                                          tmp_path):
    # Under bf16 autocast a row's prediction depends on its batch's padding, so the reference is
    # predict at the stage's own batch size (the same length-sorted batches), also in bf16.
    cfg = _cfg(prepared, tiny_model_dir, **{"train.eval_batch_size": 7, "precision": "bf16"})
    result = evaluate.run(cfg, {"data_prep": prepared, "finetune": finetuned}, tmp_path, lambda *a, **k: None)
    assert result["params"] == {"resolved.precision": "bf16"}
    model = load_multitask(finetuned / "model")
    for name in WRITTEN:
        task = name.split("-")[0]
        split = load_split(prepared / f"{name}.arrow")
        expected = predict(model, task, split, batch_size=7, device="cpu", precision="bf16")
        rows = _read_rows(tmp_path / "predictions" / f"{name}-output.csv")
        if task == "sts":
            np.testing.assert_allclose([float(v) for _, v in rows], expected, atol=6e-5)
        else:
            assert [float(v) for _, v in rows] == [float(x) for x in expected]
    fp32 = predict(model, "sst", load_split(prepared / "sst-dev.arrow"), 7, "cpu", "fp32")
    bf16 = predict(model, "sst", load_split(prepared / "sst-dev.arrow"), 7, "cpu", "bf16")
    assert (fp32 == bf16).mean() > 0.8  # bf16 moves a few near-ties, not the whole table


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
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("evaluate: precision: auto, ")
    assert printed[1:] == [
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


def test_error_analysis_agrees_with_the_prediction_files(evaluated, prepared, finetuned, shared_data_dir):
    out, result, _ = evaluated
    folder = out / "analysis"
    assert result["analysis"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "analysis.json", "sst_confusion.png", "sts_scatter.png", "worst-para.csv", "worst-sst.csv", "worst-sts.csv"]
    for png in ("sst_confusion.png", "sts_scatter.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    gold = {task: dict(zip(load_split(prepared / f"{task}-dev.arrow").ids, load_split(prepared / f"{task}-dev.arrow").labels.tolist()))
            for task in ("sst", "para", "sts")}
    rows = {task: {i.decode(): float(v) for i, v in _read_rows(out / "predictions" / f"{task}-dev-output.csv")}
            for task in gold}

    # The confusion matrix counted by hand from the file, and the F1 of each class from it.
    counts = np.zeros((5, 5), dtype=int)
    for id_, pred in rows["sst"].items():
        counts[gold["sst"][id_], int(pred)] += 1
    assert json.loads((folder / "analysis.json").read_text())["sst_confusion"] == counts.tolist()
    metrics = result["metrics"]
    for k in range(5):
        hits, predicted, actual = counts[k, k], counts[:, k].sum(), counts[k].sum()
        f1 = 2 * hits / (predicted + actual) if predicted + actual else 0.0
        assert metrics[f"dev/sst_f1_{k}"] == pytest.approx(f1)
    tp = sum(1 for i, p in rows["para"].items() if p == 1 and gold["para"][i] == 1)
    assert metrics["dev/para_precision"] == pytest.approx(tp / max(1, sum(p == 1 for p in rows["para"].values())))
    assert metrics["dev/para_recall"] == pytest.approx(tp / max(1, sum(g == 1 for g in gold["para"].values())))
    assert -1 <= metrics["dev/sts_spearman"] <= 1

    # The worst tables: only wrong sst/para rows, most confident first; sts by the largest error;
    # with the sentences of the source file.
    model = load_multitask(finetuned / "model")
    _, probs = predict_with_scores(model, "sst", load_split(prepared / "sst-dev.arrow"), 4, "cpu")
    worst_sst = list(csv.DictReader((folder / "worst-sst.csv").open(encoding="utf-8")))
    wrong = [i for i, p in rows["sst"].items() if p != gold["sst"][i]]
    assert len(worst_sst) == min(20, len(wrong)) and all(r["id"] in wrong for r in worst_sst)
    assert all(int(r["gold"]) == gold["sst"][r["id"]] and int(r["predicted"]) == rows["sst"][r["id"]] for r in worst_sst)
    confidences = [float(r["confidence"]) for r in worst_sst]
    assert confidences == sorted(confidences, reverse=True) and 0.2 <= confidences[-1] <= confidences[0] <= 1
    assert confidences[0] == pytest.approx(max(probs[i].max() for i, id_ in enumerate(rows["sst"]) if id_ in wrong), abs=1e-4)
    source = {line.split("\t")[1]: line.split("\t")[2] for line in
              (shared_data_dir / "ids-sst-dev.csv").read_text(encoding="utf-8").splitlines()[1:]}
    assert all(r["sentence"] == source[r["id"]] for r in worst_sst)
    worst_sts = list(csv.DictReader((folder / "worst-sts.csv").open(encoding="utf-8")))
    errors = [float(r["abs_error"]) for r in worst_sts]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] == pytest.approx(max(abs(rows["sts"][i] - gold["sts"][i]) for i in rows["sts"]), abs=1e-3)
    assert worst_sts[0]["sentence1"] and worst_sts[0]["sentence2"]
    worst_para = list(csv.DictReader((folder / "worst-para.csv").open(encoding="utf-8")))
    assert all(float(r["predicted"]) != gold["para"][r["id"]] for r in worst_para)
    assert all((float(r["p_paraphrase"]) > 0.5) == (r["predicted"] == "1") for r in worst_para)


def test_para_probability_is_above_a_half_exactly_where_the_prediction_is_a_paraphrase():
    import torch

    output = torch.tensor([-2.0, -0.1, 0.3, 0.7, 3.0])
    expected = {"bce": torch.sigmoid(output), "mse": output.clamp(0, 1), "cosine_embedding": (output.clamp(-1, 1) + 1) / 2}
    for loss, probability in expected.items():
        model = MultitaskModel.__new__(MultitaskModel)
        model.para_loss = loss
        got = model.para_probability(output)
        assert torch.allclose(got, probability)
        assert ((got > 0.5) == (output > model.para_threshold())).all()


def test_extra_sets_are_scored_with_their_tasks_head_and_kept_out_of_the_zip(finetuned, tiny_model_dir, shared_data_dir,
                                                                             tmp_path):
    """sts-dev rewritten SICK-style (named columns, another order, scores x * 0.8 + 1 on 1..5)
    and sst-dev under other column names: evaluate's eval/<name>/* equal a hand computation from
    the prediction files it writes and the files' own scores."""
    from stages import data_prep

    sts_lines = (shared_data_dir / "sts-dev.csv").read_text().splitlines()[1:41]
    sick = tmp_path / "sick.tsv"
    sick.write_text("relatedness_score\tsentence_B\tpair_ID\tsentence_A\n" + "".join(
        f"{float(f[4]) * 0.8 + 1:.3f}\t{f[3]}\t{f[1]}\t{f[2]}\n" for f in (line.split("\t") for line in sts_lines)))
    sst_lines = (shared_data_dir / "ids-sst-dev.csv").read_text().splitlines()[1:41]
    reviews = tmp_path / "reviews.tsv"
    reviews.write_text("key\ttext\tstars\n" + "".join(f"{f[1]}\t{f[2]}\t{f[3]}\n" for f in (l.split("\t") for l in sst_lines)))
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{f"data.{k}": None for k in (
        "sst_train", "sst_dev", "sst_test", "quora_dev", "sts_train", "sts_dev", "sts_test")}, **{"data.extra_eval": [
        {"name": "sick", "file": str(sick), "task": "sts", "scale": [1, 5], "columns": {
            "id": "pair_ID", "sentence1": "sentence_A", "sentence2": "sentence_B", "label": "relatedness_score"}},
        {"name": "reviews", "file": str(reviews), "task": "sst",
         "columns": {"id": "key", "sentence": "text", "label": "stars"}}]})
    data_prep.run(cfg, {}, tmp_path / "data", lambda *a, **k: None)
    logged = []
    result = evaluate.run(cfg, {"data_prep": tmp_path / "data", "finetune": finetuned}, tmp_path / "out",
                          lambda m, step=None: logged.append(m))

    metrics = result["metrics"]
    assert logged == [metrics]
    assert set(metrics) == {"eval/sick/pearson", "eval/sick/spearman", "eval/reviews/accuracy", "eval/reviews/macro_f1"}
    rows = _read_rows(tmp_path / "out" / "extra_eval" / "sick-output.csv")
    gold = {f[1]: float(f[4]) for f in (line.split("\t") for line in sts_lines)}  # the 0..5 originals
    assert [i.decode() for i, _ in rows] == list(gold)[:len(rows)] and len(rows) == 40
    pred = np.array([float(v) for _, v in rows])
    assert pred.std() > 0 and 0 <= pred.min() and pred.max() <= 5  # on 0..5, whatever the file's scale
    expected = np.corrcoef(pred, [gold[i.decode()] for i, _ in rows])[0, 1]
    assert metrics["eval/sick/pearson"] == pytest.approx(expected, abs=1e-3)  # files: 4 decimals; scores: 3
    stars = {f[1]: int(f[3]) for f in (line.split("\t") for line in sst_lines)}
    sst_rows = _read_rows(tmp_path / "out" / "extra_eval" / "reviews-output.csv")
    assert metrics["eval/reviews/accuracy"] == pytest.approx(np.mean([int(v) == stars[i.decode()] for i, v in sst_rows]))
    with zipfile.ZipFile(result["submission"]) as zf:
        assert zf.namelist() == []  # no leaderboard splits here, and the extra sets' files never go in
