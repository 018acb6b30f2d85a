"""`python -m pipeline sync`: send what commands on a config kept when their MLflow server
stopped answering mid-run, into the runs they were meant for.

    python -m pipeline sync [CONFIG]

The next command on the same config sends them too, before it opens its own runs; this verb
is for when no next command is planned. Exit status 0 when nothing is left to send, 3 when
the server still does not answer (the records stay for later).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import lifecycle, tracking
from pipeline.config import load_config


def main(args) -> int:
    config_path = Path(args.config).resolve()
    cfg = load_config(config_path)
    folder = lifecycle.unsent_dir(config_path.parent)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        print(f"sync: nothing kept in {folder}; every record of this config's commands reached MLflow")
        return 0
    tracking.configure(cfg.tracking.retry_seconds)
    left = lifecycle.send_unsent(config_path.parent)
    if left:
        return 3
    print(f"sync: every kept record sent ({len(files)} file(s) from {folder})")
    return 0
