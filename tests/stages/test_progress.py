"""stages.progress: plain lines at each quarter in a log (hand-computed below), a resumed loop
starting after its last printed mark, and tqdm's in-place bar instead in a terminal."""

import io
import re

from stages.progress import Progress


class Terminal(io.StringIO):
    """A stream that says it is a TTY, as a terminal's stderr/stdout does."""

    def isatty(self):
        return True


def run_loop(stream, total, initial=0, **kwargs):
    progress = Progress("finetune epoch 1/2", total=total, initial=initial, stream=stream, **kwargs)
    for done in range(initial + 1, total + 1):
        progress.update(done, f"{done * 0.5:.1f} ex/s", f"loss {1 / done:.3f}")
    progress.close()
    return stream.getvalue()


def test_a_log_gets_one_line_per_quarter():
    # 189 steps: the marks 47.25, 94.5, 141.75 and 189 are reached at steps 48, 95, 142, 189.
    assert run_loop(io.StringIO(), 189) == (
        "finetune epoch 1/2: 25% (48/189 steps), 24.0 ex/s, loss 0.021\n"
        "finetune epoch 1/2: 50% (95/189 steps), 47.5 ex/s, loss 0.011\n"
        "finetune epoch 1/2: 75% (142/189 steps), 71.0 ex/s, loss 0.007\n"
        "finetune epoch 1/2: 100% (189/189 steps), 94.5 ex/s, loss 0.005\n")


def test_steps_that_land_past_a_mark_print_their_own_percentage():
    # 10 steps: 2.5 -> step 3 (30%), 5 -> 5, 7.5 -> 8 (80%), 10.
    lines = run_loop(io.StringIO(), 10).splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "finetune epoch 1/2: 30% (3/10 steps)", "finetune epoch 1/2: 50% (5/10 steps)",
        "finetune epoch 1/2: 80% (8/10 steps)", "finetune epoch 1/2: 100% (10/10 steps)"]


def test_a_loop_shorter_than_the_marks_prints_once_per_step_not_once_per_mark():
    # 3 steps: step 1 passes the 25% mark, step 2 the 50%, step 3 both 75% and 100%.
    lines = run_loop(io.StringIO(), 3).splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "finetune epoch 1/2: 33% (1/3 steps)", "finetune epoch 1/2: 66% (2/3 steps)",
        "finetune epoch 1/2: 100% (3/3 steps)"]


def test_no_carriage_return_and_no_blank_line_and_each_line_flushed():
    class Recording(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed_at = []

        def flush(self):
            self.flushed_at.append(self.getvalue())

    stream = Recording()
    text = run_loop(stream, 189)
    assert "\r" not in text and "" not in text.split("\n")[:-1] and text.endswith("\n")
    assert stream.flushed_at == [text[:m.end()] for m in re.finditer("\n", text)]  # after every line


def test_a_resumed_loop_prints_only_the_marks_after_where_it_resumed():
    # Resumed after 95 of 189 steps (the 50% line was printed before the kill): 75% and 100% only.
    assert run_loop(io.StringIO(), 189, initial=95) == (
        "finetune epoch 1/2: 75% (142/189 steps), 71.0 ex/s, loss 0.007\n"
        "finetune epoch 1/2: 100% (189/189 steps), 94.5 ex/s, loss 0.005\n")
    # Resumed after 94 (just short of 50%): the 50% mark comes at 95 as in an uninterrupted loop.
    assert run_loop(io.StringIO(), 189, initial=94).splitlines()[0].startswith("finetune epoch 1/2: 50% (95/189 steps)")


def test_other_line_counts_empty_stats_and_an_empty_loop():
    stream = io.StringIO()
    progress = Progress("mlm_pretrain", total=4, lines=2, stream=stream)
    for done in range(1, 5):
        progress.update(done, "", "epoch 1/1")  # "" (e.g. no rate yet) is left out
    progress.write("mlm_pretrain: epoch 1: held-out perplexity 9.000")
    progress.close()
    assert stream.getvalue() == ("mlm_pretrain: 50% (2/4 steps), epoch 1/1\n"
                                 "mlm_pretrain: 100% (4/4 steps), epoch 1/1\n"
                                 "mlm_pretrain: epoch 1: held-out perplexity 9.000\n")
    assert run_loop(io.StringIO(), 0) == ""


def test_a_terminal_gets_the_in_place_bar_not_the_lines():
    stream = Terminal()
    text = run_loop(stream, 189, initial=20)
    assert "\r" in text  # redrawn in place
    assert "189/189" in text and "94.5 ex/s, loss 0.005" in text  # the final state, with the stats
    assert not re.search(r"\d+% \(\d+/189 steps\)", text)
    stream = Terminal()
    progress = Progress("mlm_pretrain", total=4, stream=stream)
    progress.write("mlm_pretrain: epoch 1: held-out perplexity 9.000")
    progress.close()
    assert "mlm_pretrain: epoch 1: held-out perplexity 9.000\n" in stream.getvalue()
