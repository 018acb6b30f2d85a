"""Sections 3-5: orchestration overhead, Tune overhead, memory.

All pipeline runs are the real CLI (`python -m pipeline run|tune`) in a subprocess with its own
artifact store and MLflow sqlite store under the suite's scratch folder, a fresh local Ray, and
`MLFLOW_TRACKING_URI` / `RAY_ADDRESS` removed from the environment. RSS is sampled from /proc
for the subprocess and all its descendants (Ray's workers included).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from bench.common import REPO, Context, _status_kib, clean_env, run_measured

# The full default run (python -m pipeline run pipeline.yaml, all data, 2 epochs, MiniLM), as
# measured on this machine before this suite existed: 29 min 3 s wall; finetune 1664 s,
# evaluate 58.7 s, data_prep 3.3 s.
FULL_DEFAULT_WALL_S = 29 * 60 + 3
GIB = 1024**3


def _pipeline(ctx: Context, name: str, verb_args: list[str], sets: dict) -> tuple:
    root = ctx.work / name
    root.mkdir(parents=True, exist_ok=True)
    overrides = {"artifacts": str(root / "artifacts"), "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                 # the stages use as many torch threads as the suite (they set num_cpus threads)
                 "stages.data_prep.num_cpus": 1, "stages.finetune.num_cpus": ctx.threads,
                 "stages.evaluate.num_cpus": ctx.threads, **sets}
    cmd = [sys.executable, "-m", "pipeline", *verb_args, str(REPO / "pipeline.yaml")]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd, root


def _stage_seconds(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+ran in ([\d.]+) s", stdout, re.M)}


def _check(m, what: str) -> None:
    if m.returncode != 0:
        raise RuntimeError(f"{what} exited {m.returncode}:\n{m.stdout[-3000:]}")


def _run_dag(ctx: Context, name: str, verb_args: list[str], sets: dict):
    cmd, root = _pipeline(ctx, name, verb_args, sets)
    first = run_measured(cmd, clean_env(root))
    _check(first, " ".join(verb_args) + f" ({name})")
    cached = run_measured(cmd, clean_env(root))
    _check(cached, " ".join(verb_args) + f" ({name}, cached re-run)")
    if "all stages cached" not in cached.stdout:
        raise RuntimeError(f"the re-run of {name} was not fully cached:\n{cached.stdout[-2000:]}")
    return first, cached


def default_dag_sets(ctx: Context) -> dict:
    """The default DAG (real MiniLM, real data) cut to fit the suite: max_rows per split, fixed steps."""
    rows, steps = (64, 4) if ctx.quick else (256, 20)
    return {"data.max_rows": rows, "train.steps_per_epoch": steps, "train.epochs": 1}


def orchestration(ctx: Context, report) -> None:
    for label, verb, sets in (("smoke DAG", ["run", "--smoke"], {}),
                              ("default DAG (small)", ["run"], default_dag_sets(ctx))):
        first, cached = _run_dag(ctx, label.split()[0], verb, sets)
        stages = _stage_seconds(first.stdout)
        compute = sum(stages.values())
        overhead = first.seconds - compute
        report.value("orchestration", f"{label}: wall - stages' own seconds",
                     f"{overhead:.1f} s of {first.seconds:.1f} s", ratio=None,
                     extra=f"{overhead / first.seconds:.0%} of this run; stages " +
                           ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
                           + (f"; sets {sets}" if sets else ""))
        if label.startswith("default"):
            share = overhead / FULL_DEFAULT_WALL_S
            report.value("orchestration", "fixed overhead / full default run (29 min 3 s)",
                         f"{share:.2%}", target_text="< 5%", met=share < 0.05,
                         extra="the same fixed overhead (process start, imports, planning, MLflow, Ray start) "
                               "over the earlier measured full default run's wall time")
            ctx.default_run_rss = (first.peak_rss_mib, first.peak_tree_rss_mib)
        report.value("orchestration", f"{label}: fully cached re-run wall", f"{cached.seconds:.1f} s",
                     target_text="< 5 s", met=cached.seconds < 5,
                     extra=f"{cached.seconds / first.seconds:.1%} of the first run; Ray not started")


# ---------------------------------------------------------------- Tune


def tune_overhead(ctx: Context, report) -> None:
    import torch

    from pipeline.config import apply_overrides, load_config
    from pipeline.store import ArtifactStore
    from stages import evaluate, finetune

    trials = 2
    cmd, root = _pipeline(ctx, "tune", ["tune", "--space", str(REPO / "search_spaces" / "loss_and_sampling.yaml"), "--smoke",
                                        "--trials", str(trials), "--name", "bench"], {})
    measured = run_measured(cmd, clean_env(root))
    _check(measured, "pipeline tune --smoke")
    exp_dir = root / "artifacts" / "tune" / "bench"
    records = [json.loads(p.read_text()) | {"_end": p.stat().st_mtime}
               for p in sorted((exp_dir / "trials").glob("*/trial.json"))]
    finished = [r for r in records if r.get("status") in ("finished", "early_stopped")]
    if len(finished) != trials:
        raise RuntimeError(f"expected {trials} finished trials, found {[r.get('status') for r in records]}")
    store = ArtifactStore(str(root / "artifacts"))
    prep_key = next(p.name for p in (root / "artifacts" / "data_prep").iterdir() if not p.name.startswith("."))
    prep_seconds = store.read_result("data_prep", prep_key).get("seconds", 0.0)
    prep_dir = root / "artifacts" / "data_prep" / prep_key
    base = load_config(exp_dir / "base_config.yaml")

    # The same trial configs, called directly in this process: finetune + evaluate.
    torch.set_num_threads(ctx.threads)
    direct = []
    for i, record in enumerate(finished):
        cfg = apply_overrides(base, record["values"])
        out = ctx.work / "tune-direct" / str(i)
        t = time.perf_counter()
        finetune.run(cfg, {"data_prep": prep_dir}, out / "finetune", lambda *a, **k: None)
        evaluate.run(cfg, {"data_prep": prep_dir, "finetune": out / "finetune"}, out / "evaluate", lambda *a, **k: None)
        direct.append(time.perf_counter() - t)
    inside = [r["_end"] - r["started"] for r in finished]
    per_trial_tune = (measured.seconds - prep_seconds) / trials
    per_trial_direct = sum(direct) / trials
    report.value("tune", f"per-trial time, `pipeline tune --smoke --trials {trials}` wall / trials",
                 f"{per_trial_tune:.1f} s", ratio=per_trial_tune / per_trial_direct,
                 extra=f"direct call of the same trial configs: {per_trial_direct:.1f} s per trial; "
                       f"whole tune wall {measured.seconds:.1f} s incl. data_prep {prep_seconds:.1f} s")
    report.value("tune", "per-trial overhead inside a trial (trial's own wall - direct)",
                 f"{(sum(inside) - sum(direct)) / trials:.1f} s", ratio=sum(inside) / sum(direct),
                 extra="trial wall from its record's start to its finished record: MLflow child run, "
                       "Tune reporting, model logging")
    report.value("tune", "fixed overhead of a search (Ray/Tune start, MLflow, best-trial registration)",
                 f"{measured.seconds - prep_seconds - sum(inside):.1f} s", None)


# ---------------------------------------------------------------- memory


def probe_step(batch: int, length: int, threads: int) -> None:
    """One multitask training step (para: two sentences of `length` tokens each, the worst case:
    every row at max length) at this batch size; prints the RSS before and the peak after, in MiB."""
    import torch

    from bench.common import base_config
    from pipeline.prepare import packaged_model_dir
    from stages.finetune import _fused_adamw, _param_groups
    from stages.multitask_model import build_model

    torch.set_num_threads(threads)
    cfg = base_config()
    model = build_model(cfg, packaged_model_dir()).train()
    optimizer = torch.optim.AdamW(_param_groups(model, 5e-5, 0.01), lr=5e-5, fused=_fused_adamw(torch.device("cpu")))
    ids = torch.randint(1000, 20000, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    # Both pair layouts, so the probe runs whatever the config's model.para.encoding is: each
    # sentence on its own, and the pair as one sequence (the second [CLS] dropped).
    pair = torch.cat([ids, ids.flip(0)[:, 1:]], dim=1)
    types = torch.cat([torch.zeros_like(ids), torch.ones_like(ids[:, 1:])], dim=1)
    batch_dict = {"input_ids_1": ids, "attention_mask_1": mask, "input_ids_2": ids.flip(0),
                  "attention_mask_2": mask, "input_ids": pair, "attention_mask": torch.ones_like(pair),
                  "token_type_ids": types, "labels": torch.randint(0, 2, (batch,)).float()}
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak at fork through exec into
    # ru_maxrss, so a probe started by a big suite process would report the suite's size.
    before = _status_kib(os.getpid(), "VmHWM") / 1024
    loss = model.loss("para", model("para", batch_dict), batch_dict["labels"])
    loss.backward()
    optimizer.step()
    peak = _status_kib(os.getpid(), "VmHWM") / 1024
    print(json.dumps({"batch": batch, "length": length, "before_mib": before, "peak_mib": peak}))


def memory(ctx: Context, report) -> None:
    import numpy as np

    # (a) a default run's peak RSS: measured during the orchestration section's default DAG.
    if getattr(ctx, "default_run_rss", None) is None:
        first, _ = _run_dag(ctx, "memory-default", ["run"], default_dag_sets(ctx))
        ctx.default_run_rss = (first.peak_rss_mib, first.peak_tree_rss_mib)
    one, tree = ctx.default_run_rss
    report.value("memory", "default DAG (small): peak RSS of one process / of the whole tree",
                 f"{one:.0f} / {tree:.0f} MiB", None,
                 extra=f"process tree incl. the driver, raylet, Ray workers; sets {default_dag_sets(ctx)}. "
                       "Training activations depend on batch size and sentence length, not on the number "
                       "of rows: the splits are memory-mapped Arrow files")

    # (b) one training step's peak RSS by batch size, worst case lengths -> largest batch in 24 GiB.
    length = 128
    sizes = (2, 4, 8) if ctx.quick else (8, 16, 32, 64)
    points = []
    for b in sizes:
        code = f"from bench.overhead import probe_step; probe_step({b}, {length}, {ctx.threads})"
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             env={**clean_env(ctx.work), "PYTHONPATH": str(REPO)})
        if out.returncode != 0:
            raise RuntimeError(f"memory probe batch {b} failed:\n{out.stderr[-2000:]}")
        points.append(json.loads(out.stdout.strip().splitlines()[-1]))
    xs = np.array([p["batch"] for p in points], dtype=float)
    ys = np.array([p["peak_mib"] for p in points])
    slope, intercept = np.polyfit(xs, ys, 1)
    largest = int((24 * 1024 - intercept) / slope)
    report.value("memory", f"one training step, para pairs at {length}+{length} tokens: peak RSS by batch",
                 ", ".join(f"{p['batch']}: {p['peak_mib']:.0f} MiB" for p in points), None,
                 extra=f"linear fit {intercept:.0f} MiB + {slope:.1f} MiB per pair")
    report.value("memory", "largest batch that fits in 24 GiB (MiniLM, fp32, worst-case lengths)",
                 f"~{largest} pairs", None, extra="EXTRAPOLATED from the fit above, not allocated "
                                                  f"(= {2 * largest} sentences of {length} tokens)")

    # (c) the Quora split as the stages hold it: numpy views of the memory-mapped Arrow file.
    from stages.batches import load_split

    prepared = ctx.prepared(None, 128)
    split = load_split(prepared / "para-train.arrow")
    kinds = {c: f"{type(v).__name__} {v.dtype} ({v.nbytes / 2**20:.1f} MiB)" for c, (v, _) in split.columns.items()}
    report.value("memory", "Quora train split in finetune/evaluate",
                 f"{len(split)} rows", None,
                 extra="token columns: " + "; ".join(f"{c} {k}" for c, k in kinds.items())
                       + f"; labels {type(split.labels).__name__} {split.labels.dtype}; ids {type(split.ids).__name__}")
