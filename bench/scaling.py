"""Section 6: how the finetune stage's time grows with data size and with max sequence length.

The real stages.finetune.run, one epoch (every task's batches once, proportional sampling), on
data_prep outputs of 1x, 2x and 4x rows per split (max length 128), and of 1x rows at max length
64, 128 and 256. Dev splits are left out of the manifest, so the time is training plus model load
and save. Ratios are against the 1x / 128-token run of the same suite run.
"""

from __future__ import annotations

import json
import time

from bench.common import Context, base_config


def _finetune_seconds(ctx: Context, rows: int, length: int) -> tuple[float, float, int]:
    from stages import finetune

    prepared = ctx.train_only(ctx.prepared(rows, length))
    cfg = base_config({"data.max_rows": rows, "data.max_length": length, "train.epochs": 1,
                       "train.checkpoint_every": 0})
    out = ctx.work / f"scaling-{rows}-{length}"
    t = time.perf_counter()
    result = finetune.run(cfg, {"data_prep": prepared}, out, lambda *a, **k: None)
    return time.perf_counter() - t, result["metrics"]["train/examples_per_s"], sum(
        min(rows, entry["rows"]) for entry in json.loads((prepared / "manifest.json").read_text())["splits"].values())


def scaling(ctx: Context, report) -> None:
    import torch

    torch.set_num_threads(ctx.threads)
    base = 32 if ctx.quick else 192
    _finetune_seconds(ctx, 16, 128)  # warm-up, not reported: first imports, allocator, thread pool
    rows = {f: _finetune_seconds(ctx, base * f, 128) for f in (1, 2, 4)}
    lengths = {128: rows[1]}
    lengths.update({n: _finetune_seconds(ctx, base, n) for n in (64, 256)})
    lengths = dict(sorted(lengths.items()))
    ref = rows[1][0]
    report.note("scaling", f"finetune.run, 1 epoch (each task's batches once, proportional sampling), {base} rows "
                "per train split at 1x, batch 32, no dev evaluation; 'stage' is its wall time incl. model load "
                "and save, 'loop' ~ train rows / its train/examples_per_s")
    for f, (s, ex_s, n) in rows.items():
        report.value("scaling", f"rows {f}x ({n} train rows), max length 128", f"stage {s:.1f} s, loop {n / ex_s:.1f} s",
                     ratio=s / ref, extra=f"{ex_s:.1f} train examples/s; loop ratio {(n / ex_s) / (rows[1][2] / rows[1][1]):.2f}x")
    for n, (s, ex_s, m) in lengths.items():
        report.value("scaling", f"rows 1x, max length {n}", f"stage {s:.1f} s, loop {m / ex_s:.1f} s", ratio=s / ref,
                     extra=f"{ex_s:.1f} train examples/s")
    _plot(ctx, rows, lengths, base)


def _plot(ctx: Context, rows: dict, lengths: dict, base: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    fs = sorted(rows)
    a.plot(fs, [rows[f][0] for f in fs], "o-", label="stage wall")
    a.plot(fs, [rows[f][2] / rows[f][1] for f in fs], "s-", label="training loop")
    a.plot(fs, [rows[1][2] / rows[1][1] * f for f in fs], "--", color="grey", label="loop, linear from 1x")
    a.set_xlabel(f"train rows per split (x {base})")
    a.set_ylabel("seconds (1 epoch)")
    a.set_xticks(fs)
    a.legend()
    ns = sorted(lengths)
    b.plot(ns, [lengths[n][0] for n in ns], "o-", label="stage wall")
    b.plot(ns, [lengths[n][2] / lengths[n][1] for n in ns], "s-", label="training loop")
    b.legend()
    b.set_xlabel("data.max_length (tokens)")
    b.set_xticks(ns)
    b.set_ylim(bottom=0)
    b.set_title(f"{base} rows per split", fontsize=9)
    fig.suptitle("finetune time vs data size and max length (same run, same machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.plot_path, dpi=110)
    plt.close(fig)
    print(f"  [scaling] plot written to {ctx.plot_path}")
