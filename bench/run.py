"""The performance benchmark suite: every figure a ratio against a baseline measured in
the same run on the same machine.

    .venv/bin/python bench/run.py                      # all sections, ~15 min on 2 CPU cores
    .venv/bin/python bench/run.py --quick              # small sizes, a check that it all runs (~3 min)
    .venv/bin/python bench/run.py --only finetune,inference --out /tmp/results.md

Sections (each a function; see bench/README.md for what is measured and how):

  finetune       training examples/s, ours vs a plain transformers loop; model FLOPs vs matmul peak
  inference      evaluate/leaderboard examples/s, ours vs the same transformers baseline
  orchestration  pipeline wall time minus the stages' own seconds (smoke and default DAG), cached re-run
  tune           per-trial overhead of `pipeline tune` vs the same trial configs called directly
  memory         peak RSS of a default run; one training step's RSS by batch size -> largest batch in 24 GiB
  scaling        finetune time vs data size (1x, 2x, 4x rows) and max length (64, 128, 256); bench/scaling.png

The table is printed last and written to bench/RESULTS.md (--out) with the command, the machine
and the load average. Scratch data (prepared Arrow files, artifacts, MLflow stores) goes to a
temporary folder removed at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

SECTIONS = ("finetune", "inference", "orchestration", "tune", "memory", "scaling")


class Report:
    """Rows of (section, measurement, value, ratio vs the same-run baseline, target, met?)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.notes: list[tuple[str, str]] = []
        self.seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    def note(self, section: str, text: str) -> None:
        self.notes.append((section, text))
        print(f"  [{section}] {text}")

    def value(self, section: str, name: str, value: str, ratio: float | None = None, target: float | None = None,
              target_text: str | None = None, met: bool | None = None, extra: str | None = None) -> None:
        if target is not None:
            target_text = f">= {target:g}x"
            met = ratio is not None and ratio >= target
        row = {"section": section, "name": name, "value": value,
               "ratio": "" if ratio is None else f"{ratio:.2f}x", "target": target_text or "",
               "met": "" if met is None else ("yes" if met else "NO"), "extra": extra or ""}
        self.rows.append(row)
        print(f"  [{section}] {name}: {value}" + (f"  ({row['ratio']})" if row["ratio"] else "")
              + (f"  target {row['target']}: {row['met']}" if row["target"] else "") + (f"  -- {extra}" if extra else ""))

    def table(self) -> str:
        head = "| section | measurement | value | ratio | target | met | notes |\n|---|---|---:|---:|---|---|---|\n"
        return head + "".join(
            f"| {r['section']} | {r['name']} | {r['value']} | {r['ratio']} | {r['target']} | {r['met']} | {r['extra']} |\n"
            for r in self.rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Performance benchmark suite; ratios against same-run baselines.")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that every section runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="results file (default: bench/RESULTS.md; --quick: bench/RESULTS-quick.md)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(args.out) if args.out else REPO / "bench" / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    command = "python bench/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))

    import torch

    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    load_before = common.loadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    ctx = common.Context(work=work, quick=args.quick, threads=args.threads)
    ctx.plot_path = out.with_name("scaling.png" if not args.quick else "scaling-quick.png")
    report = Report()
    print(f"bench: {command}; scratch {work}; load average {load_before}")
    busy = common.busy_warning(args.threads)
    if busy:
        print("WARNING: " + busy)
    from bench import overhead, scaling, throughput

    functions = {"finetune": throughput.finetune_throughput, "inference": throughput.inference_throughput,
                 "orchestration": overhead.orchestration, "tune": overhead.tune_overhead,
                 "memory": overhead.memory, "scaling": scaling.scaling}
    total = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in only:
                continue
            print(f"\n== {name} (load average {common.loadavg()})", flush=True)
            t = time.perf_counter()
            try:
                functions[name](ctx, report)
            except Exception as e:  # one broken section does not lose the others' numbers
                traceback.print_exc()
                report.failed[name] = f"{type(e).__name__}: {e}"
            report.seconds[name] = time.perf_counter() - t
            torch.set_num_threads(args.threads)
    finally:
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            common.rmtree(work)
    total = time.perf_counter() - total
    text = results_markdown(command, started, load_before, common.loadavg(), total, report, args, ctx.plot_path)
    out.write_text(text)
    print("\n" + report.table())
    for section, error in report.failed.items():
        print(f"FAILED section {section}: {error}")
    print(f"suite wall time {total / 60:.1f} min; written to {out}")
    return 1 if report.failed else 0


def results_markdown(command, started, load_before, load_after, total, report: Report, args, ctx_plot) -> str:
    m = common.machine(args.threads)
    lines = [
        "# Benchmark results" + (" (--quick: small sizes, a check, not a measurement)" if args.quick else ""),
        "",
        f"Command: `{command}` (from the repository root, `.venv/bin/python`)",
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; suite wall time {total / 60:.1f} min",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
        f"transformers {m['transformers']}, Python {m['python']}, GPU: {m['cuda']}",
        f"- load average (1, 5, 15 min) at start: {load_before}; at end: {load_after}"
        + (f" -- {busy}" if (busy := common.busy_warning(args.threads, load_before)) else ""),
        "",
        "Every ratio is against a baseline measured in this same run (see bench/README.md); absolute",
        "values depend on the machine and its load, ratios much less so. What each row measures, the",
        "levers tried (with their measured effect) and what limits the targets: bench/README.md.",
        "",
        report.table(),
    ]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {s}: {t}" for s, t in report.notes]
    if report.failed:
        lines += ["", "Failed sections:", ""] + [f"- {s}: {e}" for s, e in report.failed.items()]
    lines += ["", "Section wall times: " + ", ".join(f"{s} {v:.0f} s" for s, v in report.seconds.items())]
    if "scaling" in report.seconds and "scaling" not in report.failed:
        lines += ["", f"![finetune scaling]({Path(ctx_plot).name})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
