"""Cron expressions: parsed, stepped through and turned into systemd OnCalendar values.

Pure (no clock but the one passed in, no files), so every rule is tested directly:
five fields (minute hour day-of-month month day-of-week, names like `mon`/`jan` allowed) or a
macro (@daily, @hourly, ...); with both day fields restricted a day matching either runs.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
SYSTEMD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


@dataclass
class Cron:
    """A parsed cron expression: the allowed values of each field (day of week 0-6, Sunday 0)."""
    expression: str
    minutes: list[int]
    hours: list[int]
    days: list[int]
    months: list[int]
    weekdays: list[int]
    days_restricted: bool  # the day-of-month field was not '*...'
    weekdays_restricted: bool

    def matches_day(self, day: dt.date) -> bool:
        """Cron's rule: with both day fields restricted, a day matching either one runs."""
        if day.month not in self.months:
            return False
        in_days, in_weekdays = day.day in self.days, (day.weekday() + 1) % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays


def parse_cron(expression: str) -> Cron:
    """Five fields (minute hour day-of-month month day-of-week) or a macro; ValueError says what is wrong."""
    text = MACROS.get(expression.strip().lower(), expression.strip())
    if text.startswith("@"):
        raise ValueError(f"{expression!r}: unknown or untimed macro; use one of {', '.join(MACROS)} or five fields")
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r}: {len(fields)} fields; cron needs five: minute hour day-of-month month "
                         f"day-of-week")
    values = [_parse_field(f, *spec) for f, spec in zip(fields, FIELDS)]
    weekdays = sorted({d % 7 for d in values[4]})  # 7 is Sunday too
    return Cron(expression, values[0], values[1], values[2], values[3], weekdays,
                days_restricted=not fields[2].startswith("*"), weekdays_restricted=not fields[4].startswith("*"))


def _parse_field(field: str, name: str, low: int, high: int) -> list[int]:
    names = MONTHS if name == "month" else WEEKDAYS if name == "day of week" else {}
    out: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{name} {part!r}: the step after / must be a positive integer")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, name, low, high, names), _value(b, name, low, high, names)
            if first > last:
                raise ValueError(f"{name} {part!r}: range from {first} down to {last}")
        else:
            first = _value(base, name, low, high, names)
            last = high if step_text else first  # "5/15": from 5 to the end in steps of 15
        out.update(range(first, last + 1, step))
    return sorted(out)


def _value(text: str, name: str, low: int, high: int, names: dict) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{name} {text!r}: not a number" + (f" or a name ({', '.join(names)})" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is out of range {low}-{high}")
    return value


def next_runs(cron: Cron, after: dt.datetime, count: int = 3) -> list[dt.datetime]:
    """The next `count` times the entry fires strictly after `after` (whole minutes, local time)."""
    out = []
    day = after.date()
    for _ in range(4 * 366 + 1):  # a Feb 29 schedule fires within four years
        if cron.matches_day(day):
            for hour in cron.hours:
                for minute in cron.minutes:
                    when = dt.datetime.combine(day, dt.time(hour, minute))
                    if when > after:
                        out.append(when)
                        if len(out) == count:
                            return out
        day += dt.timedelta(days=1)
    return out


def on_calendar(cron: Cron) -> list[str]:
    """systemd OnCalendar= values equal to the cron expression (two when cron ORs the day fields)."""
    def values(items, low, high):
        return "*" if items == list(range(low, high + 1)) else ",".join(str(v) for v in items)

    clock = f"{values(cron.hours, 0, 23)}:{values(cron.minutes, 0, 59)}:00"
    months = values(cron.months, 1, 12)
    by_day = f"*-{months}-{values(cron.days, 1, 31)} {clock}"
    by_weekday = f"{','.join(SYSTEMD_DAYS[d] for d in cron.weekdays)} *-{months}-* {clock}"
    if cron.days_restricted and cron.weekdays_restricted:
        return [by_day, by_weekday]
    if cron.weekdays_restricted:
        return [by_weekday]
    return [by_day]
