"""Comparison of an ablation's variants (or a search's trials), read back from MLflow.

The rows are the parent run's child runs: an ablation's variant runs (tag `stage=variant`,
grouped by their `ablation` tag, one run per seed) or a search's trial runs (`stage=trial`).
Per group: the mean and standard deviation across seeds of dev/sst_acc, dev/para_acc,
dev/sts_corr and dev/overall, the difference of the means against the `baseline` variant (a
search's: against its best trial) with its 95% interval where pipeline/differences.py gave one,
wall time and peak memory, and for a report grid the report's published numbers beside ours (the
variant runs' `published/*` tags, pipeline/published.py). `ablate` writes the table (CSV,
Markdown) and two plots (bars with error bars, per-epoch dev curves) and logs them on the parent
run; the `report` verb prints it for any finished ablation or search.

Extra evaluation sets (data.extra_eval) add columns: every `eval/<name>/<metric>` a row's run
has (mean, std and delta like the dev metrics; no interval), after the dev ones.

One more row, `untrained`, is the child run tagged `stage=reference`: the backbone scored
without finetuning (stages/reference.py); its delta against the baseline is what training added.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline import published, tracking
from pipeline.bootstrap import RESAMPLES, excludes_zero
from pipeline.constants import DEV_METRICS, EXTRA_EVAL_PREFIX as EXTRA, METRIC, REFERENCE_STAGE

METRICS = DEV_METRICS
SHORT = {name: name.removeprefix("dev/") for name in DEV_METRICS}
BASELINE = "baseline"
UNTRAINED = "untrained"  # the row of the reference stage's run
ROW_STAGES = ("variant", "trial", REFERENCE_STAGE)  # the child runs that are rows; the rest (shared stages) are not


@dataclass
class RunRow:
    """One child run: a variant at one seed, or one trial."""
    label: str  # the variant (tag `ablation`) or the trial's run name
    run_id: str
    status: str
    seed: str
    metrics: dict[str, float]  # the latest value of each dev/* and eval/* metric
    seconds: float | None  # the variant's own compute (stage seconds), else the run's duration
    peak_rss_mb: float | None
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {epoch: value}
    published: dict[str, float] = field(default_factory=dict)  # metric -> the report's number (tags published/*)


@dataclass
class Group:
    """One variant across its seeds: a line of the table."""
    label: str
    runs: list[RunRow]
    mean: dict[str, float]
    std: dict[str, float]  # sample standard deviation; absent with fewer than two finished seeds
    delta: dict[str, float]  # mean minus the baseline's mean; absent without a baseline
    seconds: float | None  # mean over the runs
    peak_rss_mb: float | None  # max over the runs
    # metric -> the 95% interval of `delta` (pipeline/differences.py); absent where not computed
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)  # metric -> the report's number, if any

    @property
    def finished(self) -> int:
        return sum(1 for r in self.runs if r.status == "FINISHED" and METRIC in r.metrics)


# ---------------------------------------------------------------- the numbers


def extra_metrics(rows) -> list[str]:
    """The eval/<name>/<metric> names any row has (rows: RunRows or Groups), sorted."""
    return sorted({m for r in rows for m in (r.metrics if isinstance(r, RunRow) else r.mean) if m.startswith(EXTRA)})


def summarize(rows: list[RunRow], order: list[str] | None = None, baseline: str = BASELINE) -> list[Group]:
    """Group the rows by label (in `order`, then first seen) with mean, std and delta vs baseline."""
    metrics = [*METRICS, *extra_metrics(rows)]
    labels = list(dict.fromkeys([*(order or []), *(r.label for r in rows)]))
    groups = []
    for label in labels:
        runs = [r for r in rows if r.label == label]
        if not runs:
            continue
        done = [r for r in runs if r.status == "FINISHED"]
        mean, std = {}, {}
        for m in metrics:
            values = [r.metrics[m] for r in done if m in r.metrics]
            if values:
                mean[m] = sum(values) / len(values)
            if len(values) > 1:
                std[m] = math.sqrt(sum((v - mean[m]) ** 2 for v in values) / (len(values) - 1))
        seconds = [r.seconds for r in done if r.seconds is not None]
        peaks = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
        groups.append(Group(label, runs, mean, std, {}, sum(seconds) / len(seconds) if seconds else None,
                            max(peaks) if peaks else None, published=next((r.published for r in runs if r.published), {})))
    base = next((g for g in groups if g.label == baseline), None)
    if base is not None:
        for g in groups:
            g.delta = {m: g.mean[m] - base.mean[m] for m in metrics if m in g.mean and m in base.mean}
    return groups


def mean_curves(runs: list[RunRow], metric: str) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, std) of a per-epoch metric over the runs that logged it at each epoch."""
    epochs = sorted({e for r in runs for e in r.curves.get(metric, {})})
    means, stds = [], []
    for e in epochs:
        values = [r.curves[metric][e] for r in runs if e in r.curves.get(metric, {})]
        m = sum(values) / len(values)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)
    return epochs, means, stds


# ---------------------------------------------------------------- reading MLflow


def read_rows(uri: str, parent_id: str) -> tuple[dict, list[RunRow]]:
    """The parent run's tags and one RunRow per child variant/trial run."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
        max_results=5000, order_by=["attributes.start_time ASC"])
    rows = []
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("stage") not in ROW_STAGES:
            continue
        label = tags["ablation"] if tags.get("stage") == "variant" else run.info.run_name
        if tags.get("stage") == REFERENCE_STAGE:
            label = UNTRAINED
        duration = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
        curves = {}
        for m in METRICS:
            if m in metrics:
                # The first value logged at each epoch is that epoch's; the final evaluate score
                # is logged again at the last epoch's step, later.
                per_epoch: dict[int, float] = {}
                for point in sorted(client.get_metric_history(run.info.run_id, m), key=lambda p: p.timestamp):
                    if point.step >= 1:
                        per_epoch.setdefault(point.step, point.value)
                curves[m] = per_epoch
        rows.append(RunRow(label, run.info.run_id, run.info.status, tags.get("seed", run.data.params.get("seed", "")),
                           {m: v for m, v in metrics.items() if m in METRICS or m.startswith(EXTRA)},
                           # a stage run (the reference) was opened long before its stage ran: its own seconds
                           metrics.get("variant/seconds", metrics.get("stage/seconds", duration)),
                           metrics.get("variant/peak_rss_mb", metrics.get("stage/peak_rss_mb")), curves,
                           published.from_tags(tags)))
    return parent.data.tags, rows


# ---------------------------------------------------------------- formats


def to_csv(groups: list[Group]) -> str:
    header = ["variant", "runs", "finished"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std", f"{m}_delta", f"{m}_ci_low", f"{m}_ci_high", f"{m}_ci_excludes_0"]
    header += [f"{m}_published" for m in METRICS]
    extras = extra_metrics(groups)
    for m in extras:
        header += [f"{m}_mean", f"{m}_std", f"{m}_delta"]
    header += ["seconds", "peak_rss_mb", "run_ids"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for g in groups:
        line = [g.label, len(g.runs), g.finished]
        for m in METRICS:
            ci = g.ci.get(m)
            line += [_num(g.mean.get(m)), _num(g.std.get(m)), _num(g.delta.get(m)), *(_num(v) for v in ci or (None, None)),
                     "" if ci is None else str(excludes_zero(ci)).lower()]
        line += [_num(g.published.get(m), 4) for m in METRICS]
        for m in extras:
            line += [_num(g.mean.get(m)), _num(g.std.get(m)), _num(g.delta.get(m))]
        line += [_num(g.seconds, 1), _num(g.peak_rss_mb, 0), " ".join(r.run_id for r in g.runs)]
        writer.writerow(line)
    return out.getvalue()


def to_markdown(groups: list[Group]) -> str:
    """Mean ± std over seeds per metric, then the delta of dev/overall against the baseline (with its
    95% interval and `*` when that excludes 0, where differences.add_intervals gave one) and, for a
    report grid, the report's published numbers in one column; then one column per extra
    evaluation set's metric (`<name>/<metric>`)."""
    shows_published = any(g.published for g in groups)
    extras = extra_metrics(groups)
    lines = ["| variant | runs | " + " | ".join(SHORT[m] for m in METRICS) + " | Δ overall [95% CI] |"
             + (" published sst / para / sts / overall |" if shows_published else "")
             + "".join(f" {m.removeprefix(EXTRA)} |" for m in extras)
             + " wall s | peak MiB |",
             "|---|---:|" + "---:|" * len(METRICS) + "---:|" + ("---:|" if shows_published else "")
             + "---:|" * len(extras) + "---:|---:|"]
    for g in groups:
        cells = [g.label, f"{g.finished}/{len(g.runs)}"]
        for m in METRICS:
            if m not in g.mean:
                cells.append("-")
            else:
                cells.append(f"{g.mean[m]:.4f}" + (f" ± {g.std[m]:.4f}" if m in g.std else ""))
        d = g.delta.get(METRIC)
        ci = g.ci.get(METRIC)
        cells.append("-" if d is None else f"{d:+.4f}" + (
            f" [{ci[0]:+.4f}, {ci[1]:+.4f}]{'*' if excludes_zero(ci) else ''}" if ci else ""))
        if shows_published:
            cells.append(" / ".join(f"{g.published[m]:.3f}" if m in g.published else "-" for m in METRICS))
        for m in extras:
            cells.append("-" if m not in g.mean else f"{g.mean[m]:.4f}" + (f" ± {g.std[m]:.4f}" if m in g.std else ""))
        cells.append("-" if g.seconds is None else f"{g.seconds:.1f}")
        cells.append("-" if g.peak_rss_mb is None else f"{g.peak_rss_mb:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(g.ci for g in groups):
        lines.append(f"\nΔ: minus the {BASELINE} (a search: minus the best trial); [95% CI]: a paired bootstrap "
                     f"over the dev examples ({RESAMPLES} resamples; with several seeds, the seeds too); *: the interval excludes 0.")
    return "\n".join(lines) + "\n"


def plot_bars(groups: list[Group], path: Path, title: str) -> Path:
    """One panel per dev metric: a horizontal bar per variant, the error bar its std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g.mean]
    height = max(2.5, 0.32 * len(shown) + 1.2)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), height), sharey=True)
    ypos = list(range(len(shown)))[::-1]
    for ax, m in zip(axes, METRICS):
        means = [g.mean.get(m, float("nan")) for g in shown]
        errs = [g.std.get(m, 0.0) for g in shown]
        colors = ["#444444" if g.label == BASELINE else "#4C72B0" for g in shown]
        ax.barh(ypos, means, xerr=errs, color=colors, capsize=3, error_kw={"elinewidth": 1})
        base = next((g for g in shown if g.label == BASELINE and m in g.mean), None)
        if base is not None:
            ax.axvline(base.mean[m], color="#444444", linestyle="--", linewidth=0.8)
        finite = [v for v in means if not math.isnan(v)]
        if finite:  # zoom on the differences: the axis starts a little below the smallest bar
            low = min(v - e for v, e in zip(means, errs) if not math.isnan(v))
            high = max(v + e for v, e in zip(means, errs) if not math.isnan(v))
            pad = 0.1 * (high - low) + 0.01
            ax.set_xlim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
            if low < 0:  # a negative correlation: show where zero is
                ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_title(m)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, [g.label for g in shown])
    fig.suptitle(title + "  (bars: mean over seeds; error bars: std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(groups: list[Group], path: Path, title: str) -> Path:
    """Per-epoch dev metrics of every variant on one figure (mean over seeds, band = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    cmap = plt.get_cmap("tab10")
    others = [g for g in groups if g.label != BASELINE]
    for g in groups:
        i = others.index(g) if g in others else 0
        style = {"color": "black", "linewidth": 2} if g.label == BASELINE else \
                {"color": cmap(i % 10), "linestyle": ("-", "--", ":")[(i // 10) % 3], "linewidth": 1.2}
        for ax, m in zip(axes, METRICS):
            epochs, means, stds = mean_curves([r for r in g.runs if r.status == "FINISHED"], m)
            if not epochs:
                continue
            ax.plot(epochs, means, marker="o", markersize=3, label=g.label, **style)
            if any(stds):
                ax.fill_between(epochs, [a - b for a, b in zip(means, stds)], [a + b for a, b in zip(means, stds)],
                                color=style["color"], alpha=0.12)
    for ax, m in zip(axes, METRICS):
        ax.set_title(m)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title + "  (per-epoch dev scores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_comparison(groups: list[Group], out_dir: Path, title: str) -> list[Path]:
    """comparison.csv, comparison.md, comparison_bars.png, dev_curves.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.csv").write_text(to_csv(groups))
    (out_dir / "comparison.md").write_text(f"# {title}\n\n" + to_markdown(groups))
    return [out_dir / "comparison.csv", out_dir / "comparison.md",
            plot_bars(groups, out_dir / "comparison_bars.png", title),
            plot_curves(groups, out_dir / "dev_curves.png", title)]


def comparison(uri: str, parent_id: str) -> tuple[dict, list[Group]]:
    """The parent's tags and its table, read from MLflow."""
    tags, rows = read_rows(uri, parent_id)
    order = tags["ablation_variants"].split(",") if tags.get("ablation_variants") else None
    groups = summarize(rows, order)
    if tags.get("stage") != "ablation":  # a search: best trial first (untrained last); an ablation keeps its grid's order
        groups.sort(key=lambda g: (g.label == UNTRAINED, -g.mean.get(METRIC, -math.inf)))
        # A search has no baseline: each trial's delta is against the best (is the winner really better?).
        groups = summarize(rows, [g.label for g in groups], reference_label(tags, groups)) if groups else groups
    return tags, groups


def reference_label(tags: dict, groups: list[Group]) -> str | None:
    """What the deltas are against: an ablation's `baseline` variant, a search's best trial."""
    if tags.get("stage") == "ablation":
        return BASELINE
    return groups[0].label if groups and METRIC in groups[0].mean else None


def _num(value, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}f}"
