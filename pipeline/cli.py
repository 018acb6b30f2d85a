"""`python -m pipeline VERB ...`: the command line.

    python -m pipeline run [CONFIG] [--set KEY=VALUE ...] [--force STAGE|all] [--smoke] [--variant GRID:NAME]
    python -m pipeline tune [CONFIG] --space search_spaces/NAME.yaml [--trials N] [--smoke] [--resume]
    python -m pipeline ablate [CONFIG] --grid search_spaces/ablations/NAME.yaml [--seeds N] [--smoke] [--only A,B]
    python -m pipeline report RUN_ID [CONFIG] [--out DIR]
    python -m pipeline submit [CONFIG] --address http://HEAD:8265 [VERB ARGS...]
    python -m pipeline leaderboard [CONFIG] [--model MODEL_URI] [--smoke]
    python -m pipeline schedule install|show|remove [CONFIG] [--crontab-file FILE] [--systemd]
    python -m pipeline predict MODEL --task sst|para|sts FILE [--out OUT.csv] [--config CONFIG] [--smoke]
    python -m pipeline sync [CONFIG]
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

from pipeline import lifecycle
from pipeline.config import ConfigError
from pipeline.lifecycle import TrackingUnreachable
from pipeline.store import disk_full

# verb -> the module whose main(args) runs it, imported only when chosen (tune imports Ray Tune).
VERBS = {
    "run": "pipeline.run",
    "tune": "pipeline.tune",
    "ablate": "pipeline.ablate",
    "report": "pipeline.report",
    "submit": "pipeline.submit",
    "leaderboard": "pipeline.leaderboard",
    "schedule": "pipeline.schedule",
    "predict": "pipeline.predict",
    "sync": "pipeline.sync",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, lifecycle.interrupt_on_sigterm)  # kill ends a verb as Ctrl-C does
    if argv[:1] == ["submit"]:  # its own parser: the remote verb's arguments follow it verbatim
        return _exit_status(lambda: importlib.import_module(VERBS["submit"]).main(argv[1:]))
    args = _parser().parse_args(argv)
    return _exit_status(lambda: importlib.import_module(VERBS[args.verb]).main(args))


def _exit_status(command) -> int:
    """Run a verb; what stopped it, as one line on stderr and the exit status: 2 for a config
    error, 3 for an unreachable MLflow server, 1 for a failed stage, 130 for Ctrl-C, 143 for
    SIGTERM; 4 when the work is done but a server that stopped answering left part of its record
    kept for later (tracking.on_unreachable: error; 0 under local), said in one line. (The verb has already ended its MLflow runs FAILED or KILLED on the way out.)"""
    from pipeline.dag import StageFailed

    try:
        status = command()
        line, unsent_status = lifecycle.unsent_outcome()
        if line:
            print(f"\n{line}", file=sys.stderr)
        return status or unsent_status
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrackingUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # the driver's own writes (a local MLflow artifact store, a download)
        full = disk_full(e, Path(e.filename or ".").parent)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 1
    except StageFailed as e:
        print(f"\nerror: {e}\nfinished stages stay cached: the same command continues from them", file=sys.stderr)
        _say_unsent()
        return 1
    except KeyboardInterrupt:
        how = lifecycle.interruption()
        print(f"\n{how}; finished stages stay cached: the same command continues from them", file=sys.stderr)
        _say_unsent()
        return 143 if how == lifecycle.TERMINATED else 130


def _say_unsent() -> None:
    line, _ = lifecycle.unsent_outcome()
    if line:
        print(line, file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Multitask BERT experiment pipeline")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="run the pipeline's stages (cached stages are skipped)")
    run.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE|all",
                     help="re-run this stage (and what follows it) even if cached (repeatable)")
    run.add_argument("--smoke", action="store_true",
                     help="same DAG on a tiny random-weight BERT and ~64 rows per split")
    run.add_argument("--variant", metavar="GRID:NAME",
                     help="apply a named variant of an ablation grid first, e.g. "
                          "search_spaces/ablations/techniques.yaml:pcgrad (tags the runs ablation=NAME)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="a stage killed half-way continues from its last checkpoint (the default); "
                          "--no-resume starts it over (--force does too, for the stages it re-runs)")

    tune = verbs.add_parser("tune", help="hyperparameter search (Ray Tune + Optuna) over finetune + evaluate")
    tune.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    tune.add_argument("--space", required=True, metavar="FILE", help="search space YAML, e.g. search_spaces/default.yaml")
    tune.add_argument("--trials", type=int, default=8, help="number of trials (default: 8)")
    tune.add_argument("--smoke", action="store_true", help="trials on the smoke setting: tiny BERT, ~64 rows per split")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key before the search (repeatable)")
    tune.add_argument("--variant", metavar="GRID:NAME", help="search around a named ablation variant")
    tune.add_argument("--name", help="the search's name (default: SPACE[-smoke]-TIMESTAMP); with --resume, which one")
    tune.add_argument("--resume", action="store_true",
                      help="continue an interrupted search (default: the latest of this space) without redoing finished trials")
    tune.add_argument("--seed", type=int, help="the searcher's seed (default: the config's seed)")
    tune.add_argument("--include-config", action="store_true",
                      help="make the first trial the config's own values (Optuna points_to_evaluate)")

    ablate = verbs.add_parser("ablate", help="run a grid's variants side by side (shared upstream stages run once) "
                                             "and log a comparison table and plots on one MLflow parent run")
    ablate.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    ablate.add_argument("--grid", required=True, metavar="FILE",
                        help="ablation grid YAML, e.g. search_spaces/ablations/sampling.yaml")
    ablate.add_argument("--seeds", type=int, default=1,
                        help="runs per variant, with seeds SEED, SEED+1, ... (default: 1); the table gives mean and std")
    ablate.add_argument("--only", metavar="A,B", help="run only these variants of the grid (comma-separated)")
    ablate.add_argument("--smoke", action="store_true", help="every variant on the smoke setting: tiny BERT, ~64 rows")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every variant (repeatable; wins over the grid)")
    ablate.add_argument("--force", action="append", default=[], metavar="STAGE|all",
                        help="re-run this stage (and what follows it) in every variant even if cached")
    ablate.add_argument("--name", help="the ablation's MLflow run name (default: the grid's file name)")

    report = verbs.add_parser("report", help="print the comparison table of a finished ablation or search")
    report.add_argument("run_id", metavar="RUN_ID", help="the ablation's or search's MLflow parent run id")
    report.add_argument("config", nargs="?", default="pipeline.yaml",
                        help="experiment YAML whose tracking store to read (default: pipeline.yaml)")
    report.add_argument("--tracking-uri", help="read this MLflow store instead (default: as `run` would log)")
    report.add_argument("--out", metavar="DIR", help="also write comparison.csv/.md and the PNG plots here")

    verbs.add_parser("submit", add_help=False,
                     help="run a verb on a Ray cluster as a Ray job: submit [CONFIG] --address URL [VERB ARGS] "
                          "(see python -m pipeline submit --help)")

    board = verbs.add_parser("leaderboard", help="a validated CS224N submission zip from the champion model, "
                                                 "logged to MLflow (a no-op when already made)")
    board.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    board.add_argument("--model", metavar="MODEL_URI",
                       help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder "
                            "(default: the registered model's 'champion' alias, else the best finished run by dev/overall)")
    board.add_argument("--smoke", action="store_true",
                       help="smoke-sized: ~64 rows per split, the best smoke run's model (made by a smoke run if none)")
    board.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    board.add_argument("--force", action="store_true", help="predict again even if this model and data were submitted")

    schedule = verbs.add_parser("schedule", help="install/show/remove the crontab entry that runs the config's "
                                                 "schedule: section (or print a systemd timer)")
    schedule.add_argument("action", choices=["install", "show", "remove", "run"],
                          help="run: what the crontab entry calls (the schedule's commands, in order)")
    schedule.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    schedule.add_argument("--crontab-file", metavar="FILE",
                          help="read and write this file instead of the user's crontab (tests, or to review first)")
    schedule.add_argument("--systemd", action="store_true",
                          help="with install: print a systemd service + timer for the schedule instead of using cron")

    sync = verbs.add_parser("sync", help="send to MLflow what commands on this config kept when the tracking "
                                         "server stopped answering (the next command on it does too)")
    sync.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")

    predict = verbs.add_parser("predict", help="a model's predictions for a file in the CS224N layout, one line per row")
    predict.add_argument("model", metavar="MODEL",
                         help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder")
    predict.add_argument("file", metavar="FILE", help="tab-separated, with id and the task's sentence column(s)")
    predict.add_argument("--task", required=True, choices=["sst", "para", "sts"], help="what the rows are scored as")
    predict.add_argument("--out", metavar="OUT.csv", help="where to write (default: FILE's name + -predicted.csv, here)")
    predict.add_argument("--config", default="pipeline.yaml",
                         help="experiment YAML: data.max_length, train.eval_batch_size, device, the MLflow store")
    predict.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key (repeatable)")
    predict.add_argument("--smoke", action="store_true", help="the smoke settings (a smoke run's model: max_length 32)")
    predict.add_argument("--skip-bad-rows", action="store_true",
                         help="leave out rows that cannot be read (quora-dev.csv has one), instead of exit status 2")
    predict.add_argument("--tracking-uri", help="read models:/ and runs:/ from this MLflow store")

    return parser
