"""Console progress of a stage's loop that reads cleanly in a terminal and in a log file.

In a terminal (the stream is a TTY) it is tqdm's in-place bar. Anywhere else (a Ray worker,
whose output the driver forwards line by line; `make run > log`) it is one plain line each
time the loop passes another 1/`lines` of its length, e.g.

    finetune epoch 1/2: 50% (95/189 steps), 41.3 ex/s, loss sst 1.502 para 0.671 sts 2.310

flushed at once, with no carriage return and no blank line: tqdm's redraws in a non-TTY
reached the driver as hundreds of mostly empty lines.

    progress = Progress("finetune epoch 1/2", total=189, initial=first_step)
    for done in range(first_step + 1, 190):
        ...
        progress.update(done, f"{rate:.1f} ex/s", f"loss {loss:.3f}")
    progress.close()

A loop resumed at `initial` counts from there: the marks it had passed before are not printed
again. The stream defaults to stdout, the stream the stages print their other lines to, so a
log keeps them in order (a Ray worker's stdout and stderr reach the driver separately).
"""

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "step", lines: int = 4,
                 stream=None):
        self.desc, self.total, self.unit, self.lines = desc, total, unit, lines
        self.stream = stream if stream is not None else sys.stdout
        self.done = initial
        # The next mark k (of 1..lines) to print: the first one `initial` has not reached.
        self.next_mark = _marks_reached(initial, total, lines) + 1
        self.bar = None
        if _isatty(self.stream):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            mininterval=2.0, dynamic_ncols=True)

    def update(self, done: int, *stats: str) -> None:
        """The loop is at `done` of `total`; `stats` (e.g. "41.3 ex/s", "loss 0.812") follow the
        position, comma-separated; an empty one (nothing to say yet) is left out."""
        stats = [s for s in stats if s]
        if self.bar is not None:
            self.bar.update(done - self.done)
            if stats:
                # refresh=False: the bar redraws on its own mininterval, not on every step
                self.bar.set_postfix_str(", ".join(stats), refresh=False)
            self.done = done
            return
        self.done = done
        reached = _marks_reached(done, self.total, self.lines)
        if reached >= self.next_mark:
            # One line however many marks this update passed (a loop shorter than `lines`).
            self.next_mark = reached + 1
            percent = done * 100 // self.total
            self.stream.write(", ".join([f"{self.desc}: {percent}% ({done}/{self.total} {self.unit}s)", *stats]) + "\n")
            self.stream.flush()

    def write(self, line: str) -> None:
        """A line of its own, above the bar in a terminal (tqdm.write keeps the bar intact)."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _marks_reached(done: int, total: int, lines: int) -> int:
    """How many of the marks total*k/lines (k = 1..lines) `done` has reached; in integers, so
    a mark such as 189 * 3/4 = 141.75 is reached at 142, not early through rounding."""
    if total <= 0:
        return 0
    return min(lines, done * lines // total)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
