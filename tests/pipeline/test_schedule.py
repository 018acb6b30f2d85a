"""`python -m pipeline schedule`: install/show/remove on a temp crontab file (never the user's),
and the installed entry's lock and log, run for real. (Cron parsing: test_cron.py.)"""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.schedule import MARKER
from tests.conftest import REPO


@pytest.fixture
def config(tmp_path):
    (tmp_path / "exp.yaml").write_text(
        "tracking:\n  experiment: sched\n"
        "schedule:\n"
        "  cron: \"30 2 * * *\"\n"
        "  commands:\n"
        "    - run --set train.lrr=1\n"  # fails fast with a config error: the later command must not run
        "    - leaderboard\n")
    return tmp_path / "exp.yaml"


def test_install_show_remove_touch_only_this_entry(config, tmp_path, capsys):
    crontab = tmp_path / "crontab"
    crontab.write_text("MAILTO=me\n0 * * * * echo other job\n")
    assert cli.main(["schedule", "install", str(config), "--crontab-file", str(crontab)]) == 0
    assert cli.main(["schedule", "install", str(config), "--crontab-file", str(crontab)]) == 0  # replaces
    lines = crontab.read_text().splitlines()
    assert lines[:2] == ["MAILTO=me", "0 * * * * echo other job"] and len(lines) == 4
    assert lines[2].startswith(f"{MARKER}{config} (")
    entry = lines[3]
    assert entry.startswith(f"30 2 * * * cd {tmp_path} && PYTHONPATH={REPO} flock -n -E 75 {tmp_path}/artifacts/schedule.lock ")
    assert f"-m pipeline schedule run {config} >> {tmp_path}/artifacts/schedule.log 2>&1" in entry
    capsys.readouterr()
    assert cli.main(["schedule", "show", str(config), "--crontab-file", str(crontab)]) == 0
    shown = capsys.readouterr().out
    assert entry in shown and "next runs: " in shown
    assert f"command 2: python -m pipeline leaderboard {config}" in shown
    assert cli.main(["schedule", "remove", str(config), "--crontab-file", str(crontab)]) == 0
    assert crontab.read_text().splitlines() == ["MAILTO=me", "0 * * * * echo other job"]


@pytest.mark.integration
def test_the_entry_logs_stops_at_a_failure_and_never_overlaps(config, tmp_path):
    crontab = tmp_path / "crontab"
    assert cli.main(["schedule", "install", str(config), "--crontab-file", str(crontab)]) == 0
    command = crontab.read_text().splitlines()[-1].split(" ", 5)[5]  # what cron hands to sh
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    subprocess.run(["sh", "-c", command], env=env, cwd="/", timeout=120, check=True)
    log = (tmp_path / "artifacts" / "schedule.log").read_text()
    assert f"running python -m pipeline run {config} --set train.lrr=1" in log
    assert "unknown key 'train.lrr'" in log  # the command's own output is in the log
    assert "`run --set train.lrr=1` failed (exit 2)" in log
    assert "leaderboard" not in log.split("failed (exit 2)")[1]  # the second command never ran

    # While another scheduled run holds the lock, this one does nothing but say so.
    with open(tmp_path / "artifacts" / "schedule.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        subprocess.run(["sh", "-c", command], env=env, cwd="/", timeout=60, check=True)
    after = (tmp_path / "artifacts" / "schedule.log").read_text()
    assert after.startswith(log) and after[len(log):].count("\n") == 1
    assert "schedule: skipped, the previous scheduled run still holds" in after[len(log):]


def test_a_bad_schedule_is_a_config_error_naming_the_line(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text("schedule:\n  cron: \"61 2 * * *\"\n  commands: [leaderboard]\n")
    assert cli.main(["schedule", "install", str(tmp_path / "exp.yaml"), "--crontab-file", str(tmp_path / "c")]) == 2
    assert f"{tmp_path / 'exp.yaml'}:2: schedule.cron: minute 61 is out of range 0-59" in capsys.readouterr().err
    (tmp_path / "exp.yaml").write_text("schedule:\n  cron: \"0 2 * * *\"\n  commands: [\"fly away\"]\n")
    assert cli.main(["schedule", "install", str(tmp_path / "exp.yaml"), "--crontab-file", str(tmp_path / "c")]) == 2
    assert "must start with a pipeline verb" in capsys.readouterr().err
    (tmp_path / "exp.yaml").write_text("seed: 1\n")
    assert cli.main(["schedule", "install", str(tmp_path / "exp.yaml"), "--crontab-file", str(tmp_path / "c")]) == 2
    assert "schedule.cron is not set" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_systemd_units_are_printed_not_installed(config, capsys):
    assert cli.main(["schedule", "install", str(config), "--systemd"]) == 0
    out = capsys.readouterr().out
    assert "OnCalendar=*-*-* 2:30:00" in out
    assert f"ExecStart={shutil.which('flock') or '/usr/bin/flock'} -n -E 75 " in out
    assert f"{sys.executable} -m pipeline schedule run {config}" in out
