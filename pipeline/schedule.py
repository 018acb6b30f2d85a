"""`python -m pipeline schedule install|show|remove|run [CONFIG]`: the config's `schedule:` on cron.

    schedule:
      cron: "0 2 * * *"                       # five fields, or @daily, @hourly, ...
      commands:                               # pipeline verb lines, without the config
        - tune --space search_spaces/default.yaml --trials 16
        - leaderboard

`install` puts one entry for the config in the user's crontab (`--crontab-file FILE`: in that
file instead), replacing an earlier entry for the same config and leaving every other line as
it was. The entry is a marker comment naming the config, then

    CRON cd CONFIG_DIR && PYTHONPATH=REPO flock -n -E 75 LOCK PYTHON -m pipeline schedule run CONFIG >> LOG 2>&1; test $? -ne 75 || echo "$(date) skipped: ..." >> LOG

`flock -n` on `schedule.lock` means a scheduled run that finds the previous one still going
does nothing but say so in the log. `schedule run` runs the commands in order, as
`python -m pipeline VERB CONFIG ARGS` from the config's folder, and stops at the first that
fails. `install --systemd` prints a systemd service and timer doing the same instead.
`show` prints the schedule, the installed entry, the next run times and the log's last lines;
`remove` deletes the entry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config, resolve_path
from pipeline.constants import REPO
from pipeline.cron import Cron, next_runs, on_calendar, parse_cron
from pipeline.yamlfile import line_of

MARKER = "# minbert-pipeline schedule for "
VERBS = ("run", "tune", "ablate", "leaderboard", "submit")
LOCKED = 75  # flock's exit status when the lock is held (-E 75): a skipped run, not a failure


# ---------------------------------------------------------------- the command


def main(args) -> int:
    config = Path(args.config).resolve()
    if args.action == "run":
        return run_commands(config)
    if args.action == "install":
        return install(config, args.crontab_file, systemd=args.systemd)
    if args.action == "remove":
        return remove(config, args.crontab_file)
    return show(config, args.crontab_file)


def install(config: Path, crontab_file: str | None = None, systemd: bool = False) -> int:
    cfg = load_config(config)
    cron = checked_schedule(config, cfg)
    for path in (schedule_path(config, cfg.schedule.lock), schedule_path(config, cfg.schedule.log)):
        path.parent.mkdir(parents=True, exist_ok=True)
    if systemd:
        print(systemd_units(config, cfg, cron))
        return 0
    if shutil.which("flock") is None:
        raise ConfigError("schedule install: no `flock` command on this machine (util-linux); it keeps two "
                          "scheduled runs from overlapping")
    lines = crontab_lines(config, cfg)
    kept = without_entry(read_crontab(crontab_file), config)
    write_crontab(kept + lines, crontab_file)
    print(f"schedule: installed in {crontab_file or 'the crontab of ' + _user()}:")
    print("\n".join(lines))
    _print_next(cron)
    print(f"log: {schedule_path(config, cfg.schedule.log)}")
    return 0


def remove(config: Path, crontab_file: str | None = None) -> int:
    current = read_crontab(crontab_file)
    kept = without_entry(current, config)
    if kept == current:
        print(f"schedule: no entry for {config} in {crontab_file or 'the crontab'}; nothing removed")
        return 0
    write_crontab(kept, crontab_file)
    print(f"schedule: removed the entry for {config} from {crontab_file or 'the crontab'}")
    return 0


def show(config: Path, crontab_file: str | None = None) -> int:
    cfg = load_config(config)
    s = cfg.schedule
    print(f"schedule of {config}:")
    print(f"  cron:      {s.cron}")
    for i, command in enumerate(s.commands, start=1):
        print(f"  command {i}: python -m pipeline {_with_config(command, config)}")
    print(f"  lock:      {schedule_path(config, s.lock)}")
    print(f"  log:       {schedule_path(config, s.log)}")
    entry = installed_entry(read_crontab(crontab_file), config)
    print(f"installed in {crontab_file or 'the crontab'}:" if entry else
          f"not installed in {crontab_file or 'the crontab'} (python -m pipeline schedule install)")
    for line in entry:
        print(f"  {line}")
    if s.cron:
        _print_next(checked_schedule(config, cfg))
    log = schedule_path(config, s.log)
    if log.is_file():
        print(f"last lines of {log}:")
        for line in log.read_text(errors="replace").splitlines()[-8:]:
            print(f"  {line}")
    return 0


def run_commands(config: Path) -> int:
    """What the crontab entry runs: each command in order; stop at the first failure."""
    cfg = load_config(config)
    checked_schedule(config, cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"{_now()} schedule: {len(cfg.schedule.commands)} command(s) of {config}", flush=True)
    for command in cfg.schedule.commands:
        argv = [sys.executable, "-m", "pipeline", *shlex.split(_with_config(command, config))]
        print(f"{_now()} schedule: running python -m pipeline {_with_config(command, config)}", flush=True)
        start = time.time()
        status = subprocess.run(argv, cwd=config.parent, env=env).returncode
        if status != 0:
            print(f"{_now()} schedule: `{command}` failed (exit {status}) after {time.time() - start:.0f} s; "
                  f"the commands after it are skipped", flush=True)
            return status
        print(f"{_now()} schedule: `{command}` done in {time.time() - start:.0f} s", flush=True)
    print(f"{_now()} schedule: all done", flush=True)
    return 0


# ---------------------------------------------------------------- the entry


def checked_schedule(config: Path, cfg) -> Cron:
    """The parsed cron of a config whose schedule can run; errors name the file, line and key."""
    s = cfg.schedule
    if not s.cron:
        raise ConfigError(f"{_where(config, 'schedule')}: schedule.cron is not set (e.g. \"0 2 * * *\" for 02:00 daily)")
    if not s.commands:
        raise ConfigError(f"{_where(config, 'schedule')}: schedule.commands is empty (e.g. [leaderboard])")
    try:
        cron = parse_cron(s.cron)
    except ValueError as e:
        raise ConfigError(f"{_where(config, 'schedule.cron')}: schedule.cron: {e}") from None
    for i, command in enumerate(s.commands):
        words = shlex.split(command)
        where = f"{_where(config, 'schedule.commands')}: schedule.commands[{i}] {command!r}"
        if not words or words[0] not in VERBS:
            raise ConfigError(f"{where}: must start with a pipeline verb: {', '.join(VERBS)}")
        if len(words) > 1 and words[1].endswith((".yaml", ".yml")) and not words[1].startswith("-"):
            raise ConfigError(f"{where}: leave the config out; the scheduled commands run on {config}")
    return cron


def crontab_lines(config: Path, cfg) -> list[str]:
    """The marker comment and the entry for this config."""
    s = cfg.schedule
    lock, log = schedule_path(config, s.lock), schedule_path(config, s.log)
    q = shlex.quote
    command = (f"cd {q(str(config.parent))} && PYTHONPATH={q(str(REPO))} flock -n -E {LOCKED} {q(str(lock))} "
               f"{q(sys.executable)} -m pipeline schedule run {q(str(config))} >> {q(str(log))} 2>&1; "
               f"test $? -ne {LOCKED} || echo \"$(date) schedule: skipped, the previous scheduled run still holds "
               f"{lock}\" >> {q(str(log))}")
    if "%" in command:  # cron turns a bare % into a newline
        command = command.replace("%", "\\%")
    return [f"{MARKER}{config} (remove with: python -m pipeline schedule remove {config})",
            f"{s.cron} {command}"]


def without_entry(crontab: list[str], config: Path) -> list[str]:
    """The crontab's lines less this config's marker and the entry after it."""
    out, skip = [], False
    for line in crontab:
        if skip:
            skip = False
            continue
        if _is_marker(line, config):
            skip = True
            continue
        out.append(line)
    return out


def installed_entry(crontab: list[str], config: Path) -> list[str]:
    for i, line in enumerate(crontab):
        if _is_marker(line, config):
            return crontab[i:i + 2]
    return []


def read_crontab(crontab_file: str | None) -> list[str]:
    if crontab_file:
        path = Path(crontab_file)
        return path.read_text().splitlines() if path.exists() else []
    proc = subprocess.run([_crontab_command(), "-l"], capture_output=True, text=True)
    if proc.returncode != 0:
        if "no crontab" in proc.stderr.lower():
            return []
        raise RuntimeError(f"crontab -l failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


def write_crontab(lines: list[str], crontab_file: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if crontab_file:
        path = Path(crontab_file)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    proc = subprocess.run([_crontab_command(), "-"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"crontab - failed: {proc.stderr.strip()}")


def systemd_units(config: Path, cfg, cron: Cron) -> str:
    """A oneshot service and its timer, to install by hand (systemd does not read crontabs)."""
    s = cfg.schedule
    name = f"minbert-pipeline-{hashlib.sha1(str(config).encode()).hexdigest()[:8]}"
    lock, log = schedule_path(config, s.lock), schedule_path(config, s.log)
    calendars = "\n".join(f"OnCalendar={c}" for c in on_calendar(cron))
    return f"""# ~/.config/systemd/user/{name}.service
[Unit]
Description=minbert pipeline schedule of {config}

[Service]
Type=oneshot
WorkingDirectory={config.parent}
Environment=PYTHONPATH={REPO}
ExecStart={shutil.which('flock') or '/usr/bin/flock'} -n -E {LOCKED} {lock} {sys.executable} -m pipeline schedule run {config}
SuccessExitStatus={LOCKED}
StandardOutput=append:{log}
StandardError=append:{log}

# ~/.config/systemd/user/{name}.timer
[Unit]
Description=minbert pipeline schedule of {config} ({cron.expression})

[Timer]
{calendars}
Persistent=true

[Install]
WantedBy=timers.target

# then: systemctl --user daemon-reload && systemctl --user enable --now {name}.timer"""


# ---------------------------------------------------------------- helpers


def schedule_path(config: Path, value: str) -> Path:
    return resolve_path(config.parent, value)


def _with_config(command: str, config: Path) -> str:
    verb, _, rest = command.strip().partition(" ")
    return f"{verb} {shlex.quote(str(config))}" + (f" {rest.strip()}" if rest.strip() else "")


def _is_marker(line: str, config: Path) -> bool:
    return line.startswith(f"{MARKER}{config} (") or line == f"{MARKER}{config}"


def _where(config: Path, key: str) -> str:
    """`file:line` of a key in the config file (the file alone when the key is not written there)."""
    return line_of(config, key)


def _print_next(cron: Cron) -> None:
    runs = next_runs(cron, dt.datetime.now().replace(second=0, microsecond=0))
    print("next runs: " + ", ".join(r.strftime("%Y-%m-%d %H:%M") for r in runs))


def _crontab_command() -> str:
    command = shutil.which("crontab")
    if command is None:
        raise ConfigError("no `crontab` command on this machine: install cron, print a systemd timer with "
                          "`schedule install --systemd`, or write a file with --crontab-file FILE")
    return command


def _user() -> str:
    import getpass

    return getpass.getuser()


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
