"""Names every layer of pipeline/ shares; imports nothing of the project.

The bottom of the import graph (tests/pipeline/test_layers.py keeps it that way): a metric name,
a tag or the repository's location is written here once, not in each verb.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: stages/ (the cache's code version) and git live here

TASKS = ("sst", "para", "sts")
METRIC = "dev/overall"  # what searches maximise, tables sort by and the leaderboard picks by
DEV_METRICS = ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", METRIC)
EXTRA_EVAL_PREFIX = "eval/"  # an extra evaluation set's metrics (data.extra_eval): eval/<name>/<metric>
REFERENCE_STAGE = "reference"  # the stage scoring the untrained backbone: a comparison's `untrained` row

# MLflow tags written on runs (stage, ablation, ... are plain names; these carry meaning across verbs).
ERROR_TAG = "error"  # why a run ended FAILED or KILLED
ERROR_TAG_CHARS = 4000  # the end of a traceback is the part that says what went wrong
DRIVER_PID_TAG = "driver_pid"  # the process that opened the run; gone while RUNNING = stale
DRIVER_HOST_TAG = "driver_host"
DRIVER_START_TAG = "driver_start"  # that process's start time, so a reused pid is not mistaken for it


def is_remote(location: str) -> bool:
    """A pyarrow.fs URI (s3://, gs://, ...) rather than a local folder."""
    return "://" in location


def error_text(error: BaseException | str) -> str:
    """An exception (or a message) as the text of the error tag, cut to size."""
    if isinstance(error, str):
        text = error
    elif isinstance(error, KeyboardInterrupt):
        text = "interrupted (KeyboardInterrupt)"
    else:
        text = f"{type(error).__name__}: {error}"
    return text[-ERROR_TAG_CHARS:]
