"""The GPU check: what one CUDA device gives this pipeline, in one short run (under 8 minutes).

    .venv/bin/python bench/gpu_check.py            # or: make gpu-check; writes bench/GPU-RESULTS.md
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu.md

1. The device's bf16 and fp32 (TF32 off) matmul peaks (an 8192^3 torch.mm, best of 5).
2. Finetune throughput under bf16 autocast (precision: bf16, as `auto` picks on CUDA): the stage's
   own step (build_model, length-bucketed batches, make_batch, AdamW fused, clipping) on real
   SST / Quora / STS train rows, batch 32, max length 128, pipeline.yaml's recipe, for MiniLM and
   a BERT-base-sized random-weight encoder (768 wide, 12 layers, the real vocabulary); an fp32
   line of the same loop is the ratio's baseline. Model FLOPs of the real tokens as a share of
   the bf16 peak (bench/throughput.py's count).
3. Predict throughput (stages.multitask_model.predict, what evaluate calls) on the dev sets in
   bf16 at eval batch 128 and 512, against fp32 at 128.
4. `pipeline tune --smoke --trials 4` with 0.25 GPU per trial (finetune and evaluate), so four
   trials share the device: wall time, trials finished, and how many ran at once.

Without a CUDA device it stops at once with one line saying so (exit status 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STEPS, WARMUP = 60, 5  # timed and untimed training steps per encoder and precision
PREDICT_ROWS = 2048  # dev rows per task for the predict lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "GPU-RESULTS.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); nothing measured", file=sys.stderr)
        return 2

    from bench.common import Context, base_config, clean_env
    from bench.throughput import encoder_linear_weights, forward_flops, head_rows
    from stages import finetune as finetune_stage
    from stages.batches import bucketed_batches
    from stages.device import autocast
    from stages.multitask_model import batch_lengths, build_model, make_batch, predict
    from stages.tiny_bert import write_tiny_bert

    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    rows: list[tuple[str, str, str]] = []  # (measurement, value, notes)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(work=work, quick=False, threads=8)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 lines are fp32, not TF32
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; scratch {work}", flush=True)

    # ---- 1. matmul peaks
    peak = {p: _matmul_peak(dtype) for p, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    rows += [(f"{p} matmul peak (8192^3 torch.mm)", f"{peak[p] / 1e3:.1f} TFLOP/s", "") for p in peak]

    # ---- 2. finetune throughput, MiniLM and a BERT-base-sized encoder
    prepared = ctx.prepared(None, 128)
    train = finetune_stage._load_splits(prepared, "train")
    dev = {t: head_rows(s, PREDICT_ROWS) for t, s in finetune_stage._load_splits(prepared, "dev").items()}
    base_dir = write_tiny_bert(work / "bert-base-random", hidden=768, layers=12, heads=12, intermediate=3072)
    for name, model_dir in (("MiniLM-L6", ctx.model_dir), ("BERT-base size, random", base_dir)):
        cfg = base_config({"model.dir": str(model_dir), "device": "cuda"})
        flops_args = encoder_linear_weights(Path(model_dir))
        rates = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, Path(model_dir)).to(device).train()
            encodings = {t: model.batch_encoding(t) for t in train}
            rng = np.random.default_rng(cfg.seed)
            batches = {t: list(bucketed_batches(batch_lengths(t, s, encodings[t]), 32, rng)) for t, s in train.items()}
            optimizer = torch.optim.AdamW(finetune_stage._param_groups(model, cfg.train.lr, cfg.train.weight_decay),
                                          lr=cfg.train.lr, fused=True)
            examples, flops, seconds = 0, 0.0, 0.0
            for i in range(WARMUP + STEPS):
                task = ("sst", "para", "sts")[i % 3]
                batch = make_batch(task, train[task], batches[task][i // 3], device, encodings[task])
                torch.cuda.synchronize()
                t = time.perf_counter()
                with autocast(device, precision):
                    output = model(task, batch)
                loss = model.loss(task, output, batch["labels"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if i >= WARMUP:
                    seconds += time.perf_counter() - t
                    examples += len(batches[task][i // 3])
                    for key, mask in batch.items():
                        if key.startswith("attention_mask"):
                            flops += 3 * forward_flops(mask.sum(1).cpu().numpy(), *flops_args)
            rates[precision] = examples / seconds
            if precision == "bf16":
                rows.append((f"finetune {name}, bf16: examples/s", f"{rates['bf16']:.0f}",
                             f"{rates['bf16'] / rates['fp32']:.2f}x the same loop in fp32 ({rates['fp32']:.0f}); "
                             f"model FLOPs {flops / seconds / peak['bf16']:.1%} of the bf16 peak"))
            model.eval()
            with torch.no_grad():
                for bs in ((128,) if precision == "fp32" else (128, 512)):
                    predict(model, "sst", head_rows(dev["sst"], 64), bs, device, precision)  # warm-up
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    n = sum(len(predict(model, task, s, bs, device, precision)) for task, s in dev.items())
                    torch.cuda.synchronize()
                    rows.append((f"predict {name}, {precision}, eval batch {bs}: examples/s",
                                 f"{n / (time.perf_counter() - t):.0f}", f"{n} dev rows"))
            del model, optimizer
            torch.cuda.empty_cache()
        print("\n".join(f"  {r[0]}: {r[1]}  {r[2]}" for r in rows), flush=True)

    # ---- 4. four smoke trials sharing the device
    root = work / "tune"
    cmd = [sys.executable, "-m", "pipeline", "tune", str(REPO / "pipeline.yaml"), "--space",
           str(REPO / "search_spaces" / "default.yaml"), "--trials", "4", "--smoke", "--name", "gpu-check"]
    for key, value in {"artifacts": root / "artifacts", "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                       "stages.finetune.num_gpus": 0.25, "stages.evaluate.num_gpus": 0.25,
                       "stages.finetune.num_cpus": 2, "stages.evaluate.num_cpus": 2}.items():
        cmd += ["--set", f"{key}={value}"]
    root.mkdir(parents=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(root), capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    records = [json.loads(p.read_text()) | {"_end": p.stat().st_mtime}  # the record's last write: the trial's end
               for p in (root / "artifacts" / "tune" / "gpu-check" / "trials").glob("*/trial.json")]
    done = [r for r in records if r.get("status") in ("finished", "early_stopped")]
    rows.append(("tune --smoke --trials 4, 0.25 GPU per trial: wall", f"{wall:.0f} s",
                 f"exit {proc.returncode}; {len(done)} of 4 trials finished; at most {_concurrent(records)} at once"))
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)

    total = time.perf_counter() - t0
    text = _markdown(started, total, rows, argv)
    Path(args.out).write_text(text)
    print(text)
    return 0 if proc.returncode == 0 and len(done) == 4 else 1


def _matmul_peak(dtype, n: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n torch.mm on the device."""
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _concurrent(records: list[dict]) -> int:
    """The most trials whose [started, last record write] spans overlap."""
    spans = [(r["started"], r["_end"]) for r in records if "started" in r]
    return max((sum(s <= t < e for s, e in spans) for t, _ in spans), default=0)


def _markdown(started, total: float, rows, argv) -> str:
    props = torch.cuda.get_device_properties(0)
    command = "python bench/gpu_check.py" + ("" if not argv else " " + " ".join(argv))
    head = (f"# GPU check\n\nCommand: `{command}`\n\n- date: {started:%Y-%m-%d %H:%M %Z}; wall {total / 60:.1f} min\n"
            f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}\n\n| measurement | value | notes |\n|---|---:|---|\n")
    return head + "".join(f"| {m} | {v} | {n} |\n" for m, v, n in rows)


if __name__ == "__main__":
    sys.exit(main())
