"""End to end: `python -m pipeline ablate --smoke` against a real `mlflow server` on 127.0.0.1,
`python -m pipeline report`, and the MLflow UI's compare page rendered by headless Chromium;
every report grid (search_spaces/ablations/reports/) with its published numbers beside ours."""

import csv
import io
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline import verdicts
from pipeline.grids import load_grid_with_published
from tests.conftest import REPO, MlflowServer, mlflow_runs, run_pipeline, write_experiment

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server

GRID = """# test grid: two variants, and two claims on them (one helps, one the same pair reversed, hurts)
variants:
  baseline: {}
  concat_pairs: {model.para.encoding: concat, model.sts.encoding: concat}
claims:
  concat_pairs:
    says: concatenated pairs beat siamese embeddings, on Quora
    report: C
    rows: ["D: concat pairs", "C: + round-robin, BatchNorm, weight decay"]
    variant: concat_pairs
    against: baseline
    metric: para
    direction: helps
    published:
      variant: {sst: 0.396, para: 0.855, sts: 0.870}
      against: {sst: 0.458, para: 0.770, sts: 0.575}
  siamese_pairs:
    report: C
    rows: ["C: + round-robin, BatchNorm, weight decay", "D: concat pairs"]
    variant: baseline
    against: concat_pairs
    metric: overall
    direction: hurts
    published:
      variant: {sst: 0.458, para: 0.770, sts: 0.575}
      against: {sst: 0.396, para: 0.855, sts: 0.870}
"""
SEEDS = 2
REPORT_GRIDS = sorted((REPO / "search_spaces" / "ablations" / "reports").glob("*.yaml"))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server: sqlite backend, artifacts proxied over HTTP to a temp folder."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.url
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data_dir, mlflow_server):
    work = tmp_path_factory.mktemp("ablate")
    write_experiment(work, "ablate-e2e", f"  uri: {mlflow_server}\n", shared_data_dir)
    (work / "grid.yaml").write_text(GRID)
    return work


@pytest.fixture(scope="module")
def ablation(workdir):
    proc = run_pipeline(workdir, "ablate", "exp.yaml", "--grid", "grid.yaml", "--smoke", "--seeds", str(SEEDS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(mlflow_server, ablation):
    client, all_runs = mlflow_runs(mlflow_server, "ablate-e2e")
    parents = [r for r in all_runs if r.data.tags.get("stage") == "ablation"]
    assert len(parents) == 1
    return client, parents[0], all_runs


def children_of(all_runs, run_id):
    return [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == run_id]


def test_parent_and_one_run_per_variant_and_seed(runs):
    client, parent, all_runs = runs
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ablation_variants"] == "baseline,concat_pairs"
    assert parent.data.tags["best_variant"] in ("baseline", "concat_pairs")
    variants = [r for r in children_of(all_runs, parent.info.run_id) if r.data.tags.get("stage") == "variant"]
    assert sorted((r.data.tags["ablation"], r.data.tags["seed"]) for r in variants) == [
        ("baseline", "11711"), ("baseline", "11712"), ("concat_pairs", "11711"), ("concat_pairs", "11712")]
    for r in variants:
        assert r.info.status == "FINISHED"
        # The same params as a plain run: the whole flattened config, the variant's change included.
        assert r.data.params["model.para.encoding"] == ("concat" if r.data.tags["ablation"] == "concat_pairs" else "separate")
        assert r.data.params["seed"] == r.data.tags["seed"]
        for m in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"):
            assert 0 <= r.data.metrics[m] <= 1 or m == "dev/sts_corr"
        assert r.data.metrics["variant/seconds"] > 0 and r.data.metrics["variant/peak_rss_mb"] > 50
        history = client.get_metric_history(r.info.run_id, "dev/overall")
        assert {p.step for p in history} == {1, 2}  # per-epoch curve, then the final score at the last step
        # Its own finetune and evaluate nest under it.
        assert sorted(c.info.run_name for c in children_of(all_runs, r.info.run_id)) == ["evaluate", "finetune"]


def test_shared_data_prep_ran_once_under_the_parent(runs):
    _, parent, all_runs = runs
    data_prep = [r for r in all_runs if r.data.tags.get("stage") == "data_prep"]
    assert len(data_prep) == 1
    assert data_prep[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(data_prep[0].data.tags["shared_by"].split(",")) == 2 * SEEDS
    finetunes = [r for r in all_runs if r.data.tags.get("stage") == "finetune"]
    assert len(finetunes) == 2 * SEEDS and len({r.data.tags["cache_key"] for r in finetunes}) == 2 * SEEDS


def test_comparison_artifacts_on_the_parent(runs, tmp_path):
    client, parent, all_runs = runs
    names = sorted(a.path for a in client.list_artifacts(parent.info.run_id, "comparison"))
    assert names == ["comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison_bars.png",
                     "comparison/dev_curves.png"]
    local = Path(client.download_artifacts(parent.info.run_id, "comparison", str(tmp_path)))
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO((local / "comparison.csv").read_text()))}
    assert list(table) == ["baseline", "concat_pairs", "untrained"]
    assert table["baseline"]["finished"] == str(SEEDS)
    for variant, line in list(table.items())[:2]:
        seeds = [r for r in all_runs if r.data.tags.get("stage") == "variant" and r.data.tags["ablation"] == variant]
        mean = sum(r.data.metrics["dev/overall"] for r in seeds) / SEEDS
        assert float(line["dev/overall_mean"]) == pytest.approx(mean, abs=1e-6)
        assert float(line["dev/overall_std"]) >= 0
    assert float(table["baseline"]["dev/overall_delta"]) == 0
    # The paired bootstrap over the dev predictions on disk: an interval for every dev score of the
    # variant, none for the baseline itself.
    for m in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"):
        low, high = float(table["concat_pairs"][f"{m}_ci_low"]), float(table["concat_pairs"][f"{m}_ci_high"])
        assert -2 <= low <= high <= 2
        assert table["concat_pairs"][f"{m}_ci_excludes_0"] == str(low > 0 or high < 0).lower()
        assert table["baseline"][f"{m}_ci_low"] == ""
    assert (local / "comparison_bars.png").read_bytes()[:4] == b"\x89PNG"


def test_untrained_row_is_the_reference_stage_computed_once(workdir, runs, tmp_path):
    """One reference stage for the 2 variants x 2 seeds, under the parent; the comparison's
    `untrained` row carries exactly the scores the stage computed (its result in the store)."""
    client, parent, all_runs = runs
    references = [r for r in all_runs if r.data.tags.get("stage") == "reference"]
    assert len(references) == 1
    ref = references[0]
    assert ref.data.tags["mlflow.parentRunId"] == parent.info.run_id and ref.info.status == "FINISHED"
    computed = json.loads((workdir / "artifacts" / "reference" / ref.data.tags["cache_key"] / "result.json")
                          .read_text())
    assert computed["metrics"]["dev/sts_corr"] == pytest.approx(ref.data.metrics["dev/sts_corr"], abs=1e-9)
    assert 0 <= ref.data.metrics["reference/sst_majority"] <= 1
    local = Path(client.download_artifacts(parent.info.run_id, "comparison", str(tmp_path)))
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO((local / "comparison.csv").read_text()))}
    row = table["untrained"]
    assert (row["runs"], row["finished"], row["run_ids"]) == ("1", "1", ref.info.run_id)
    assert float(row["dev/sts_corr_mean"]) == pytest.approx(computed["metrics"]["dev/sts_corr"], abs=1e-6)
    assert float(row["dev/overall_delta"]) == pytest.approx(
        computed["metrics"]["dev/overall"] - float(table["baseline"]["dev/overall_mean"]), abs=1e-5)
    assert parent.data.tags["best_variant"] != "untrained"


def test_report_prints_the_table(workdir, runs):
    _, parent, all_runs = runs
    proc = run_pipeline(workdir, "report", parent.info.run_id, "exp.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| variant | runs |")
    assert lines[1].startswith("| baseline | 2/2 |") and lines[2].startswith("| concat_pairs | 2/2 |")
    assert " [" in lines[2].split("|")[7] and "excludes 0" in proc.stdout  # the Δ overall's 95% interval
    assert "no intervals" not in proc.stdout  # every trained row has its predictions; untrained has none to find
    sts = next(r for r in all_runs if r.data.tags.get("stage") == "reference").data.metrics["dev/sts_corr"]
    cells = [c.strip() for c in lines[3].strip("| ").split("|")]
    assert cells[:2] == ["untrained", "1/1"] and cells[4] == f"{sts:.4f}"  # variant, runs, sst, para, sts
    missing = run_pipeline(workdir, "report", "0" * 32, "exp.yaml")
    assert missing.returncode == 2 and "no run" in missing.stderr


def table_lines(text: str, header: str) -> list[str]:
    """The Markdown table that starts with `header` in text, to its last row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    return lines[start:next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))]


def test_claims_verdicts_on_the_parent_in_ablate_and_in_report(workdir, ablation, runs, tmp_path):
    """claims/ on the parent: each claim's delta and interval are the comparison's for that pair
    (the reversed claim its negation), its verdict the rule's; ablate and report print the same table."""
    client, parent, _ = runs
    names = sorted(a.path for a in client.list_artifacts(parent.info.run_id, "claims"))
    assert names == ["claims/claims.csv", "claims/claims.md", "claims/claims.png"]
    local = Path(client.download_artifacts(parent.info.run_id, "claims", str(tmp_path)))
    claims = {r["claim"]: r for r in csv.DictReader(io.StringIO((local / "claims.csv").read_text()))}
    compared = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path)))
    concat = next(r for r in csv.DictReader(io.StringIO(compared.read_text())) if r["variant"] == "concat_pairs")
    helps, hurts = claims["concat_pairs"], claims["siamese_pairs"]
    para = (float(concat["dev/para_acc_ci_low"]), float(concat["dev/para_acc_ci_high"]))
    assert float(helps["delta"]) == pytest.approx(float(concat["dev/para_acc_delta"]), abs=1e-6)
    assert (float(helps["ci_low"]), float(helps["ci_high"])) == pytest.approx(para, abs=1e-6)
    assert helps["verdict"] == verdicts.verdict("helps", para) and helps["seeds"] == str(SEEDS)
    assert float(helps["published_delta"]) == pytest.approx(0.085)
    overall = (float(concat["dev/overall_ci_low"]), float(concat["dev/overall_ci_high"]))
    assert float(hurts["delta"]) == pytest.approx(-float(concat["dev/overall_delta"]), abs=1e-6)
    assert (float(hurts["ci_low"]), float(hurts["ci_high"])) == pytest.approx((-overall[1], -overall[0]), abs=1e-6)
    # baseline - concat "hurts" holds exactly when concat - baseline helps.
    assert hurts["verdict"] == verdicts.verdict("helps", overall)
    if hurts["verdict"] == verdicts.NO_EFFECT:
        assert float(hurts["half_width"]) == pytest.approx((overall[1] - overall[0]) / 2, abs=1e-6)
    counted = {k: v for k, v in client.get_run(parent.info.run_id).data.metrics.items() if k.startswith("claims/")}
    assert sum(counted.values()) == 2 and counted[f"claims/{helps['verdict'].replace(' ', '_')}"] >= 1
    assert (local / "claims.png").read_bytes()[:4] == b"\x89PNG"
    header = "| claim | report | rows |"
    table = table_lines((local / "claims.md").read_text(), header)
    assert [line.split(" | ")[0] for line in table[2:]] == ["| concat_pairs", "| siamese_pairs"]
    assert table == table_lines(ablation.stdout, header)
    report = run_pipeline(workdir, "report", parent.info.run_id, "exp.yaml")
    assert report.returncode == 0, report.stderr
    assert "Which published claims hold:" in report.stdout and table == table_lines(report.stdout, header)


def test_rerun_is_cached_and_skips_ray(workdir, runs):
    proc = run_pipeline(workdir, "ablate", "exp.yaml", "--grid", "grid.yaml", "--smoke", "--only", "baseline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all stages cached; Ray not started" in proc.stdout
    assert "| baseline | 1/1 |" in proc.stdout and "| untrained | 1/1 |" in proc.stdout
    assert proc.stdout.count("| not run |") == 2  # both claims need concat_pairs, left out by --only


def test_mlflow_ui_compare_page_shows_the_variant_runs(mlflow_server, runs, tmp_path):
    """The page people open: MLflow's compare view of the variant runs, rendered headless."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium); the UI check needs it")
    _, parent, all_runs = runs
    variants = [r for r in children_of(all_runs, parent.info.run_id) if r.data.tags.get("stage") == "variant"]
    url = (f"{mlflow_server}/#/compare-runs?runs={json.dumps([r.info.run_id for r in variants])}"
           f"&experiments={json.dumps([parent.info.experiment_id])}").replace(" ", "")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-extensions", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1100", "--virtual-time-budget=20000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "compare.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    for r in variants:
        assert r.info.run_name in dom, f"{r.info.run_name} not on the compare page"
    assert "Comparing 4 Runs" in dom
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_a_failing_variant_does_not_stop_the_others(tmp_path, shared_data_dir):
    write_experiment(tmp_path, "ablate-fail", data_dir=shared_data_dir)
    (tmp_path / "grid.yaml").write_text(
        "# one variant reads a data file that is not there\n"
        "variants:\n  baseline: {}\n  broken: {data.sst_train: no-such-file.csv}\n")
    proc = run_pipeline(tmp_path, "ablate", "exp.yaml", "--grid", "grid.yaml", "--smoke")
    assert proc.returncode == 1
    # One line with the stage's exception, its type and message (the full traceback is the run's error tag).
    assert re.search(r"^variant broken failed: stage data_prep failed: FileNotFoundError: \S+/no-such-file\.csv: "
                     r"data file not found \(data\.sst_train\)$", proc.stderr, re.M), proc.stderr[-3000:]
    assert "| baseline | 1/1 |" in proc.stdout and "| broken | 0/1 |" in proc.stdout
    client, all_runs = mlflow_runs(tmp_path, "ablate-fail")
    by_name = {r.info.run_name: r for r in all_runs if r.data.tags.get("stage") in ("ablation", "variant")}
    assert by_name["baseline"].info.status == "FINISHED" and "dev/overall" in by_name["baseline"].data.metrics
    assert by_name["broken"].info.status == "FAILED" and "no-such-file.csv" in by_name["broken"].data.tags["error"]
    parent = by_name["ablation grid-smoke"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_variants"] == "broken"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "comparison")]
    assert "RUNNING" not in {r.info.status for r in all_runs}


@pytest.fixture(scope="module")
def reports_workdir(tmp_path_factory, shared_data_dir):
    """One folder, store and MLflow experiment for the five report grids: data_prep runs once."""
    work = tmp_path_factory.mktemp("reports")
    write_experiment(work, "ablate-reports", data_dir=shared_data_dir)
    return work


@pytest.mark.parametrize("grid", REPORT_GRIDS, ids=lambda p: p.stem)
def test_a_report_grid_runs_with_the_published_numbers_beside_ours(reports_workdir, grid):
    proc = run_pipeline(reports_workdir, "ablate", "exp.yaml", "--grid", str(grid), "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, variants, numbers = load_grid_with_published(grid)
    out_dir = Path(re.search(r"^comparison: +(\S+)", proc.stdout, re.M).group(1))
    md = (out_dir / "comparison.md").read_text().splitlines()
    assert "| Δ overall [95% CI] | published sst / para / sts / overall |" in md[2]
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in md[4:] if line.startswith("| ")}
    assert list(lines) == [*variants, "untrained"]  # the untrained reference row comes last
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO((out_dir / "comparison.csv").read_text()))}
    for name, cells in numbers.items():
        shown = " / ".join("-" if v is None else f"{v:.3f}" for v in cells.values())
        assert lines[name].startswith(f"| {name} | 1/1 |") and f"| {shown} |" in lines[name], lines[name]
        assert table[name]["dev/sst_acc_published"] == f"{cells['sst']:.4f}"
    # On the variant runs in MLflow, where the comparison read them from.
    _, all_runs = mlflow_runs(reports_workdir, "ablate-reports")
    parent = next(r for r in all_runs if r.data.tags.get("mlflow.runName") == f"ablation {grid.stem}-smoke")
    tagged = {r.data.tags["ablation"]: r.data.tags for r in all_runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.data.tags.get("stage") == "variant"}
    assert {name: float(tags["published/sts"]) for name, tags in tagged.items()} == \
        {name: cells["sts"] for name, cells in numbers.items()}
