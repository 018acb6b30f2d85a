"""Cron expressions by hand-checked dates: no clock, no crontab, no files (pipeline/cron.py is pure)."""

import datetime as dt
import shutil
import subprocess

import pytest

from pipeline.cron import next_runs, on_calendar, parse_cron


def test_fields_expand_to_the_values_cron_means():
    cron = parse_cron("*/15 2,14 1-3 jan,jun mon-fri")
    assert cron.minutes == [0, 15, 30, 45]
    assert cron.hours == [2, 14]
    assert cron.days == [1, 2, 3]
    assert cron.months == [1, 6]
    assert cron.weekdays == [1, 2, 3, 4, 5]
    assert parse_cron("5/20 * * * 7").minutes == [5, 25, 45]  # from 5 to the end, steps of 20
    assert parse_cron("0 0 * * 7").weekdays == [0]  # 7 is Sunday too
    assert parse_cron("@daily").minutes == [0] and parse_cron("@daily").hours == [0]


def test_next_runs_by_hand():
    # 2024-01-01 was a Monday. Weekdays at 02:30: Tue 2nd, Wed 3rd, Thu 4th.
    after = dt.datetime(2024, 1, 1, 3, 0)
    assert next_runs(parse_cron("30 2 * * 1-5"), after) == [
        dt.datetime(2024, 1, 2, 2, 30), dt.datetime(2024, 1, 3, 2, 30), dt.datetime(2024, 1, 4, 2, 30)]
    # Both day fields restricted: cron fires on either (the 1st/15th, or a Sunday: 7th, 14th, 21st).
    assert next_runs(parse_cron("0 0 1,15 * sun"), dt.datetime(2024, 1, 1, 0, 0), 4) == [
        dt.datetime(2024, 1, 7), dt.datetime(2024, 1, 14), dt.datetime(2024, 1, 15), dt.datetime(2024, 1, 21)]
    # Strictly after: a run at exactly `after` is not next. 2024 is a leap year.
    assert next_runs(parse_cron("0 12 29 2 *"), dt.datetime(2024, 2, 29, 12, 0), 1) == [dt.datetime(2028, 2, 29, 12, 0)]


@pytest.mark.parametrize("expression, message", [
    ("60 * * * *", "minute 60 is out of range 0-59"),
    ("* * *", "3 fields; cron needs five"),
    ("0 0 * * fri-mon", "range from 5 down to 1"),
    ("*/0 * * * *", "step after / must be a positive integer"),
    ("@reboot", "untimed macro"),
    ("0 0 * foo *", "month 'foo': not a number or a name"),
])
def test_bad_expressions_say_what_is_wrong(expression, message):
    with pytest.raises(ValueError, match=message):
        parse_cron(expression)


def test_systemd_calendar_matches_cron():
    assert on_calendar(parse_cron("30 2 * * 1-5")) == ["Mon,Tue,Wed,Thu,Fri *-*-* 2:30:00"]
    assert on_calendar(parse_cron("0 3 1 * *")) == ["*-*-1 3:0:00"]
    # cron ORs two restricted day fields; systemd ANDs within one line, so two lines.
    assert on_calendar(parse_cron("0 0 1,15 * sun")) == ["*-*-1,15 0:0:00", "Sun *-*-* 0:0:00"]
    if shutil.which("systemd-analyze"):
        for spec in on_calendar(parse_cron("*/20 2 1,15 6 sun")):
            assert subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True).returncode == 0, spec
