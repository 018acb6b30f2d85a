"""Which published claims hold: a grid's claims (pipeline/claims.py) measured on an ablation's runs.

    rows, note = verdicts.measure(uri, parent_id, groups, grid.claims, store)
    print(verdicts.to_markdown(rows))

Per claim, ours is the variant's mean over seeds minus the against's on every dev score (sst,
para, sts, overall, and mean = (sst + para + sts) / 3, the overall report E prints), each with
the 95% paired-bootstrap interval of pipeline/differences.py: both rows scored on the same
resampled dev examples and, with several seeds, the same resampled seeds. The claim's own metric
decides (the rule: `verdict`):

    holds                 the interval excludes 0 on the published side (the claim's direction)
    reversed              it excludes 0 on the other side
    no detectable effect  it holds 0; its half-width is about the smallest effect this run could
                          have told from noise, so a real effect that large would have excluded 0

A claim whose variant or against was not run (`ablate --only`) is `not run`; one whose rows have
no dev predictions on disk, `no interval`. `ablate` logs the table on the parent run under
claims/ (claims.md, claims.csv, claims.png) and prints it; `report RUN_ID` recomputes it from the
same child runs and the copy of the grid logged on the parent, so both print the same verdicts.
"""

from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import bootstrap, comparison, differences, grids, tracking
from pipeline.claims import CELLS, METRICS, Claim
from pipeline.constants import METRIC

HOLDS, REVERSED, NO_EFFECT = "holds", "reversed", "no detectable effect"
NOT_RUN, NO_INTERVAL = "not run", "no interval"
DEV = {"sst": "dev/sst_acc", "para": "dev/para_acc", "sts": "dev/sts_corr", "overall": METRIC}
SHOWN = ("sst", "para", "sts", "overall")  # ours on each, beside the deciding metric's
ARTIFACTS = "claims"  # the parent run's artifact folder
COLORS = {HOLDS: "#2a9d4b", REVERSED: "#c0392b", NO_EFFECT: "#7f7f7f", NO_INTERVAL: "#b0b0b0"}
RULE = (f"\nours: the variant's mean over seeds minus the against's, [95% CI] a paired bootstrap over the dev "
        f"examples ({bootstrap.RESAMPLES} resamples; with several seeds, the seeds too), *: it excludes 0. "
        f"The claim's metric decides: {HOLDS}: the interval excludes 0 in the published direction; {REVERSED}: "
        f"it excludes 0 the other way; {NO_EFFECT} (±h): it holds 0, h its half-width, about the smallest "
        f"effect this run could have seen.")


def verdict(direction: str, ci: tuple[float, float]) -> str:
    """The verdict on a claim whose published direction is `direction` (helps: the variant above
    the against; hurts: below) from the 95% interval of our variant minus against."""
    if not bootstrap.excludes_zero(ci):
        return NO_EFFECT
    return HOLDS if (ci[0] > 0) == (direction == "helps") else REVERSED


def half_width(ci: tuple[float, float]) -> float:
    """Half the interval's width: with the interval holding 0, about the smallest effect the run could have seen."""
    return (ci[1] - ci[0]) / 2


@dataclass
class Measured:
    """One claim on one ablation's runs."""
    claim: Claim
    delta: dict[str, float]  # metric (claims.METRICS) -> ours, variant minus against
    ci: dict[str, tuple[float, float]]  # metric -> the 95% interval of delta
    seeds: int  # finished runs of the smaller of the two rows
    verdict: str  # HOLDS, REVERSED, NO_EFFECT, NOT_RUN or NO_INTERVAL


def measure(uri: str, parent_id: str, groups: list[comparison.Group], claims: dict[str, Claim],
            store=None) -> tuple[list[Measured], str | None]:
    """Every claim measured on the ablation's groups; the note says what had no interval and why."""
    by_label = {g.label: g for g in groups}
    pairs = list(dict.fromkeys((c.variant, c.against) for c in claims.values()
                               if c.variant in by_label and c.against in by_label))
    found, note = (differences.pair_differences(uri, parent_id, groups, pairs, store, gold_from=comparison.BASELINE)
                   if pairs else ({}, None))
    rows = []
    for c in claims.values():
        if c.variant not in by_label or c.against not in by_label:
            rows.append(Measured(c, {}, {}, 0, NOT_RUN))
            continue
        a, b = by_label[c.variant], by_label[c.against]
        delta = {m: _value(a.mean, m) - _value(b.mean, m) for m in METRICS
                 if _value(a.mean, m) is not None and _value(b.mean, m) is not None}
        diffs = found.get((c.variant, c.against), {})
        ci = {m: bootstrap.interval(_value(diffs, m)) for m in METRICS if _value(diffs, m) is not None}
        decided = ci.get(c.metric)
        rows.append(Measured(c, delta, ci, min(a.finished, b.finished),
                             verdict(c.direction, decided) if decided else NO_INTERVAL))
    return rows, note


def counts(rows: list[Measured]) -> dict[str, int]:
    """How many claims got each verdict, as the parent run's metrics claims/holds, ..."""
    return {f"{ARTIFACTS}/{name.replace(' ', '_')}": sum(r.verdict == name for r in rows)
            for name in (HOLDS, REVERSED, NO_EFFECT, NOT_RUN, NO_INTERVAL)}


def _value(values: dict, metric: str):
    """A claim metric from {dev metric name: a number or resampled array}; mean from the three tasks'."""
    if metric == "mean":
        parts = [values.get(DEV[c]) for c in CELLS]
        return None if any(p is None for p in parts) else sum(parts) / 3
    return values.get(DEV[metric])


def of_run(uri: str, parent_id: str, tags: dict) -> dict[str, Claim]:
    """The claims of the grid an ablation ran: the copy `ablate` logged on its parent run (else
    the file its tag names, if still there); none for a search or a grid without claims."""
    from mlflow.exceptions import MlflowException

    grid = tags.get("ablation_grid")
    if tags.get("stage") != "ablation" or not grid:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return grids.read_claims(tracking.MlflowClient(uri).download_artifacts(parent_id, Path(grid).name, tmp))
        except (MlflowException, OSError):
            return grids.read_claims(grid) if Path(grid).is_file() else {}


# ---------------------------------------------------------------- formats


def to_markdown(rows: list[Measured]) -> str:
    lines = ["| claim | report | rows | variant vs against | metric | published Δ | ours Δ [95% CI] | verdict | "
             + " | ".join(f"ours Δ {m}" for m in SHOWN) + " |",
             "|---|---|---|---|---|---:|---:|---|" + "---:|" * len(SHOWN)]
    for r in rows:
        c = r.claim
        cells = [c.name, c.report, f"{c.rows[0]} vs {c.rows[1]}", f"{c.variant} vs {c.against}", c.metric,
                 _published_cell(c), _ours(r, c.metric), _verdict_cell(r), *(_ours(r, m) for m in SHOWN)]
        lines.append("| " + " | ".join(cells) + " |")
    says = [f"- {r.claim.name}: {r.claim.says}" for r in rows if r.claim.says]
    return "\n".join([*lines, RULE, *([""] + says if says else [])]) + "\n"


def _published_cell(c: Claim) -> str:
    delta = c.published_delta()
    if delta is None:
        return f"{c.direction} (stated)"
    a, v = (c.published[side][c.metric] for side in ("against", "variant"))
    return f"{delta:+.3f} ({a:.3f} → {v:.3f}), {c.direction}"


def _ours(r: Measured, metric: str) -> str:
    if metric not in r.delta:
        return "-"
    ci = r.ci.get(metric)
    return f"{r.delta[metric]:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]{'*' if bootstrap.excludes_zero(ci) else ''}"
                                         if ci else "")


def _verdict_cell(r: Measured) -> str:
    return f"{NO_EFFECT} (±{half_width(r.ci[r.claim.metric]):.4f})" if r.verdict == NO_EFFECT else r.verdict


def to_csv(rows: list[Measured]) -> str:
    header = ["claim", "says", "report", "variant_row", "against_row", "variant", "against", "metric", "direction",
              "published_variant", "published_against", "published_delta", "delta", "ci_low", "ci_high", "verdict",
              "half_width", "seeds"]
    for m in SHOWN:
        header += [f"{m}_published_delta", f"{m}_delta", f"{m}_ci_low", f"{m}_ci_high"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        c, ci = r.claim, r.ci.get(r.claim.metric)
        line = [c.name, c.says, c.report, *c.rows, c.variant, c.against, c.metric, c.direction,
                *(_num(c.published.get(side, {}).get(c.metric)) for side in ("variant", "against")),
                _num(c.published_delta()), _num(r.delta.get(c.metric)), *(_num(v) for v in ci or (None, None)),
                r.verdict, _num(half_width(ci) if ci else None), r.seeds]
        for m in SHOWN:
            line += [_num(c.published_delta(m)), _num(r.delta.get(m)), *(_num(v) for v in r.ci.get(m) or (None, None))]
        writer.writerow(line)
    return out.getvalue()


def _num(value) -> str:
    return "" if value is None else f"{value:.6f}"


def plot(rows: list[Measured], path: Path, title: str) -> Path:
    """Per claim, on its own metric: the published delta (a hollow diamond) and ours with its 95%
    interval (a dot coloured by the verdict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.34 * len(rows) + 1.6)))
    ypos = list(range(len(rows)))[::-1]
    for y, r in zip(ypos, rows):
        published = r.claim.published_delta()
        if published is not None:
            ax.plot([published], [y], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="none")
        ours, ci = r.delta.get(r.claim.metric), r.ci.get(r.claim.metric)
        if ours is not None:
            err = [[max(0.0, ours - ci[0])], [max(0.0, ci[1] - ours)]] if ci else None
            ax.errorbar([ours], [y], xerr=err, fmt="o", color=COLORS.get(r.verdict, "#b0b0b0"), capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_yticks(ypos, [f"{r.claim.name} ({r.claim.metric})" for r in rows])
    ax.set_xlabel("variant - against, on the claim's metric")
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="none",
                      label="published")]
    handles += [Line2D([], [], marker="o", color=color, linestyle="none", label=f"ours: {name}")
                for name, color in COLORS.items()]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title(title + "  (ours: 95% paired-bootstrap interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write(rows: list[Measured], out_dir: Path, title: str) -> list[Path]:
    """claims.csv, claims.md and claims.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "claims.csv").write_text(to_csv(rows))
    (out_dir / "claims.md").write_text(f"# {title}: which published claims hold\n\n" + to_markdown(rows))
    return [out_dir / "claims.csv", out_dir / "claims.md", plot(rows, out_dir / "claims.png", title)]
