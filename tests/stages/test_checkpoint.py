"""Checkpoints: a finetune or mlm_pretrain killed mid-epoch and run again in the same `out`
ends exactly where an uninterrupted run ends (same history, same weights)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from pipeline.config import PipelineConfig, apply_overrides
from stages import checkpoint, finetune, mlm_pretrain


class Killed(Exception):
    """Stands in for kill -9: the stage stops right after an optimizer step."""


def run_killed_after(n_steps: int, stage_run, *args) -> None:
    """Call stage_run(*args) and stop it with Killed right after its n-th optimizer step."""
    count = [0]

    def hook(*_):
        count[0] += 1
        if count[0] == n_steps:
            raise Killed(f"killed after step {n_steps}")

    handle = register_optimizer_step_post_hook(hook)
    try:
        with pytest.raises(Killed):
            stage_run(*args)
    finally:
        handle.remove()


def no_log(*_a, **_k):
    pass


def _cfg(shared_data_dir, tiny_model_dir, **overrides):
    return apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(shared_data_dir), "model.dir": str(tiny_model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop",
        "train.epochs": 2, "train.batch_size": 16, "train.eval_batch_size": 64,
        "train.lr": 1e-3, "train.warmup_ratio": 0.2, "train.checkpoint_every": 3, **overrides})


def _history(out):
    rows = json.loads((out / "history.json").read_text())
    return [{k: v for k, v in row.items() if k != "train/examples_per_s"} for row in rows]


def _weights(folder):
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items()}


# ---------------------------------------------------------------- the checkpoint file


def test_save_is_atomic_and_load_checks_the_fingerprint(tmp_path, capsys):
    fp = checkpoint.fingerprint({"lr": 1e-3}, "data")
    assert fp == checkpoint.fingerprint({"lr": 1e-3}, "data")
    assert fp != checkpoint.fingerprint({"lr": 2e-3}, "data")
    checkpoint.save(tmp_path, {"fingerprint": fp, "step": 6, "w": torch.arange(3.0)})
    # A write killed half-way leaves only its temp file: the last whole checkpoint still loads.
    (tmp_path / "checkpoint" / ".state.pt.tmp-999").write_bytes(b"\x80half")
    state = checkpoint.load(tmp_path, fp, "test")
    assert state["step"] == 6 and torch.equal(state["w"], torch.arange(3.0))
    assert list((tmp_path / "checkpoint").glob("state.pt")) and not list(tmp_path.glob("*.tmp*"))

    assert checkpoint.load(tmp_path, checkpoint.fingerprint("other"), "test") is None
    assert "made with a different config or data; starting over" in capsys.readouterr().out
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"not a torch file")
    assert checkpoint.load(tmp_path, fp, "test") is None
    assert "ignoring unreadable checkpoint" in capsys.readouterr().out
    checkpoint.remove(tmp_path)
    assert checkpoint.load(tmp_path, fp, "test") is None


def test_rng_state_round_trip_replays_the_same_draws():
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    rng.random(3), torch.rand(2), torch.rand(2, generator=gen)
    saved = checkpoint.rng_state({"r": rng}, {"g": gen})
    first = (rng.random(4), torch.rand(4), torch.rand(4, generator=gen))
    rng.random(7), torch.rand(9), torch.rand(1, generator=gen)  # move everything on
    checkpoint.restore_rng(saved, {"r": rng}, {"g": gen})
    again = (rng.random(4), torch.rand(4), torch.rand(4, generator=gen))
    assert np.array_equal(first[0], again[0])
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


# ---------------------------------------------------------------- finetune


FINETUNE_SETUPS = {
    # dropout (torch RNG), warmup + decay (scheduler), proportional task order (numpy plan)
    "default": {},
    # PCGrad draws from the numpy generator during training; Lookahead and normalized loss
    # weighting carry state of their own
    "pcgrad_lookahead_normalized": {"train.sampling": "summed", "train.pcgrad": True, "train.lookahead": True,
                                    "train.lookahead_k": 2, "loss.weighting": "normalized",
                                    "train.steps_per_epoch": 8},
    # per-task encodings and a learned hybrid weight (optimizer state of its own), a cosine lr, a
    # part of sst's rows (24: 2 batches) and para in epoch 1 only: epoch 1 has 2 + 3 + 3 = 8 steps
    "recipe_switches": {"model.para.encoding": "concat", "model.sts.head": "hybrid", "train.lr_schedule": "cosine",
                        "train.data_fraction.sst": 0.5, "train.task_epochs.para": 1},
    # the weight average (its own state, what is scored and saved)
    "ema": {"train.ema_decay": 0.9},
    # bf16 autocast: the fp32 master weights and optimizer state resume; the bf16 math repeats
    "bf16": {"precision": "bf16"},
    "bf16_pals_pcgrad": {"precision": "bf16", "model.pals.enabled": True, "model.pals.size": 16, "model.pals.heads": 2,
                         "train.sampling": "summed", "train.pcgrad": True, "train.steps_per_epoch": 8},
}


@pytest.mark.parametrize("setup", FINETUNE_SETUPS)
def test_finetune_killed_mid_epoch_resumes_to_the_uninterrupted_result(
        setup, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **FINETUNE_SETUPS[setup])
    inputs = {"data_prep": prepared}
    whole = finetune.run(cfg, inputs, tmp_path / "whole", no_log)

    # In epoch 1 (9 or 8 steps), after the checkpoint at step 6; Lookahead's step runs AdamW's
    # step inside it, so each training step calls the optimizer-step hook twice.
    run_killed_after(8 * (2 if cfg.train.lookahead else 1), finetune.run, cfg, inputs, tmp_path / "resumed", no_log)
    saved = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)
    assert saved["resume_at"] == (1, 6)  # mid-epoch: 6 steps of epoch 1 done

    resumed = finetune.run(cfg, inputs, tmp_path / "resumed", no_log)
    assert resumed["metrics"] == {**whole["metrics"], "train/examples_per_s": resumed["metrics"]["train/examples_per_s"]}
    assert _history(tmp_path / "resumed") == _history(tmp_path / "whole")
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / "checkpoint").exists()  # finished: removed


def test_finetune_without_restored_rng_would_differ(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    """The resume test above can fail: resuming the same checkpoint with another dropout
    stream gives other weights."""
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1})
    inputs = {"data_prep": prepared}
    finetune.run(cfg, inputs, tmp_path / "whole", no_log)
    run_killed_after(7, finetune.run, cfg, inputs, tmp_path / "resumed", no_log)
    path = tmp_path / "resumed" / "checkpoint" / "state.pt"
    saved = torch.load(path, weights_only=False)
    saved["rng"]["torch"] = torch.Generator().manual_seed(123).get_state()
    torch.save(saved, path)
    finetune.run(cfg, inputs, tmp_path / "resumed", no_log)
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "resumed" / "model")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_ignores_a_checkpoint_of_another_config(prepared, shared_data_dir, tiny_model_dir, tmp_path, capsys):
    inputs = {"data_prep": prepared}
    other_cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.lr": 3e-3})
    run_killed_after(5, finetune.run, other_cfg, inputs, tmp_path / "b", no_log)
    assert (tmp_path / "b" / "checkpoint" / "state.pt").is_file()
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.checkpoint_every": 0})  # not in the fingerprint
    fresh = finetune.run(cfg, inputs, tmp_path / "a", no_log)
    assert "starting over" not in capsys.readouterr().out
    other = finetune.run(cfg, inputs, tmp_path / "b", no_log)
    assert "made with a different config or data; starting over" in capsys.readouterr().out
    assert _history(tmp_path / "b") == _history(tmp_path / "a")
    assert other["metrics"]["best/dev_overall"] == fresh["metrics"]["best/dev_overall"]


# ---------------------------------------------------------------- mlm_pretrain


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlm_pretrain_killed_mid_epoch_resumes_to_the_uninterrupted_result(
        precision, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{
        "precision": precision, "mlm.epochs": 2, "mlm.batch_size": 16, "mlm.lr": 1e-3, "mlm.checkpoint_every": 4})
    inputs = {"data_prep": prepared}
    logged_whole = []
    whole = mlm_pretrain.run(cfg, inputs, tmp_path / "whole", lambda m, step=None: logged_whole.append((step, m)))
    steps = int(whole["metrics"]["mlm/steps"])
    assert steps > 10  # two epochs of several batches each: the kill below lands inside an epoch

    run_killed_after(6, mlm_pretrain.run, cfg, inputs, tmp_path / "resumed", no_log)  # after the checkpoint at step 4
    saved = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 0, 4)

    resumed = mlm_pretrain.run(cfg, inputs, tmp_path / "resumed", no_log)
    assert resumed["metrics"] == whole["metrics"]
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / "checkpoint").exists()
