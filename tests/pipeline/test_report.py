"""The comparison table's numbers against hand-computed values, its formats and plots."""

import csv
import io
import math

import pytest

from pipeline.comparison import RunRow, mean_curves, plot_bars, plot_curves, summarize, to_csv, to_markdown


def row(label, overall, sst=0.5, seed="1", status="FINISHED", seconds=10.0, peak=100.0, curve=None):
    return RunRow(label, f"{label}-{seed}", status, seed,
                  {"dev/overall": overall, "dev/sst_acc": sst, "dev/para_acc": 0.7, "dev/sts_corr": 0.2},
                  seconds, peak, {"dev/overall": curve or {1: overall - 0.1, 2: overall}})


@pytest.fixture
def rows():
    return [
        row("pcgrad", 0.60, seed="1", seconds=30.0, peak=300.0),
        row("baseline", 0.50, sst=0.40, seed="1", seconds=10.0),
        row("baseline", 0.54, sst=0.44, seed="2", seconds=14.0, peak=120.0),
        row("pcgrad", 0.64, seed="2", seconds=34.0, peak=280.0),
        row("pcgrad", 0.0, seed="3", status="FAILED", seconds=None, peak=500.0),
    ]


def test_mean_std_and_delta_against_the_baseline(rows):
    groups = summarize(rows, order=["baseline", "pcgrad"])
    assert [g.label for g in groups] == ["baseline", "pcgrad"]
    base, pcgrad = groups
    assert base.mean["dev/overall"] == pytest.approx(0.52)
    # Sample std of (0.50, 0.54): sqrt(((-0.02)^2 + 0.02^2) / 1) = 0.028284...
    assert base.std["dev/overall"] == pytest.approx(math.sqrt(0.0008))
    assert base.mean["dev/sst_acc"] == pytest.approx(0.42)
    # The failed seed counts as a run, not in the mean: (0.60 + 0.64) / 2.
    assert pcgrad.mean["dev/overall"] == pytest.approx(0.62)
    assert pcgrad.delta["dev/overall"] == pytest.approx(0.10)
    assert base.delta["dev/overall"] == pytest.approx(0.0)
    assert pcgrad.delta["dev/sst_acc"] == pytest.approx(0.5 - 0.42)
    assert (pcgrad.finished, len(pcgrad.runs)) == (2, 3)
    assert pcgrad.seconds == pytest.approx(32.0) and base.seconds == pytest.approx(12.0)
    assert pcgrad.peak_rss_mb == 500.0  # the worst of all its runs, failed ones included


def test_one_seed_has_no_std_and_no_baseline_means_no_delta():
    groups = summarize([row("a", 0.5), row("b", 0.6)])
    assert [g.label for g in groups] == ["a", "b"]
    assert groups[0].std == {} and groups[0].delta == {}


def test_mean_curves_average_each_epoch_over_seeds():
    runs = [row("a", 0.5, curve={1: 0.2, 2: 0.4}), row("a", 0.5, seed="2", curve={1: 0.4, 2: 0.6, 3: 0.7})]
    epochs, means, stds = mean_curves(runs, "dev/overall")
    assert epochs == [1, 2, 3]
    assert means == pytest.approx([0.3, 0.5, 0.7])
    assert stds == pytest.approx([math.sqrt(0.02), math.sqrt(0.02), 0.0])


def test_csv_and_markdown(rows):
    groups = summarize(rows, order=["baseline", "pcgrad"])
    table = list(csv.DictReader(io.StringIO(to_csv(groups))))
    assert [r["variant"] for r in table] == ["baseline", "pcgrad"]
    assert float(table[1]["dev/overall_mean"]) == pytest.approx(0.62)
    assert float(table[1]["dev/overall_delta"]) == pytest.approx(0.10)
    assert table[1]["runs"] == "3" and table[1]["finished"] == "2"
    assert table[0]["run_ids"] == "baseline-1 baseline-2"
    md = to_markdown(groups).splitlines()
    assert md[0].startswith("| variant | runs | sst_acc | para_acc | sts_corr | overall | Δ overall")
    assert md[3].startswith("| pcgrad | 2/3 |")
    assert "0.6200 ± 0.0283" in md[3] and "+0.1000" in md[3]


def test_plots_are_pngs(rows, tmp_path):
    groups = summarize(rows, order=["baseline", "pcgrad"])
    for path in (plot_bars(groups, tmp_path / "bars.png", "t"), plot_curves(groups, tmp_path / "curves.png", "t")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_intervals_in_csv_and_markdown_and_the_mark_when_they_exclude_zero(rows):
    groups = summarize(rows, order=["baseline", "pcgrad"])
    groups[1].ci = {"dev/overall": (0.02, 0.18), "dev/sst_acc": (-0.01, 0.17)}
    table = list(csv.DictReader(io.StringIO(to_csv(groups))))
    assert (table[1]["dev/overall_ci_low"], table[1]["dev/overall_ci_high"]) == ("0.020000", "0.180000")
    assert table[1]["dev/overall_ci_excludes_0"] == "true" and table[1]["dev/sst_acc_ci_excludes_0"] == "false"
    assert table[0]["dev/overall_ci_low"] == "" and table[1]["dev/para_acc_ci_low"] == ""
    md = to_markdown(groups).splitlines()
    assert "Δ overall [95% CI]" in md[0]
    assert "+0.1000 [+0.0200, +0.1800]*" in md[3]
    assert "| baseline | 2/2 |" in md[2] and "+0.0000 |" in md[2]
    assert "excludes 0" in md[-1]
    groups[1].ci["dev/overall"] = (-0.02, 0.18)
    assert "+0.1000 [-0.0200, +0.1800] |" in to_markdown(groups)


def test_published_numbers_beside_ours_only_when_a_row_has_them(rows):
    rows[1].published = {"dev/sst_acc": 0.505, "dev/para_acc": 0.822, "dev/sts_corr": 0.496, "dev/overall": 0.692}
    rows[2].published = dict(rows[1].published)
    groups = summarize(rows, order=["baseline", "pcgrad"])
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO(to_csv(groups)))}
    assert table["baseline"]["dev/sts_corr_published"] == "0.4960" and table["pcgrad"]["dev/sts_corr_published"] == ""
    md = to_markdown(groups).splitlines()
    assert "| Δ overall [95% CI] | published sst / para / sts / overall | wall s |" in md[0]
    assert md[1].count("|") == md[0].count("|")
    assert "| 0.505 / 0.822 / 0.496 / 0.692 |" in md[2] and "| - / - / - / - |" in md[3]
    assert "published" not in to_markdown(summarize([row("a", 0.5)]))


def test_extra_evaluation_sets_are_extra_columns_in_csv_and_markdown(rows):
    for r, value in zip(rows, (0.30, 0.10, 0.20, 0.50)):  # pcgrad, baseline, baseline, pcgrad (the failed run: none)
        r.metrics["eval/sick/pearson"] = value
    groups = summarize(rows, order=["baseline", "pcgrad"])
    base, pcgrad = groups
    assert base.mean["eval/sick/pearson"] == pytest.approx(0.15) and pcgrad.mean["eval/sick/pearson"] == pytest.approx(0.40)
    assert pcgrad.delta["eval/sick/pearson"] == pytest.approx(0.25)
    table = list(csv.DictReader(io.StringIO(to_csv(groups))))
    assert float(table[1]["eval/sick/pearson_mean"]) == pytest.approx(0.40)
    assert float(table[1]["eval/sick/pearson_delta"]) == pytest.approx(0.25)
    assert float(table[0]["eval/sick/pearson_std"]) == pytest.approx(math.sqrt(0.005), abs=1e-6)
    md = to_markdown(groups).splitlines()
    assert "| Δ overall [95% CI] | sick/pearson | wall s | peak MiB |" in md[0]
    assert md[1].count("|") == md[0].count("|")
    assert "| 0.1500 ± 0.0707 |" in md[2] and "| 0.4000 ± 0.1414 |" in md[3]
    # A row without the set (the untrained reference) shows "-"; without any set, no column.
    groups.append(summarize([row("untrained", 0.3)])[0])
    cells = [c.strip() for c in to_markdown(groups).splitlines()[4].strip("| ").split("|")]
    assert cells[0] == "untrained" and cells[7] == "-"  # variant, runs, 4 dev metrics, Δ overall, sick/pearson
    assert "sick" not in to_markdown(summarize([row("a", 0.5)])) and "eval/" not in to_csv(summarize([row("a", 0.5)]))
