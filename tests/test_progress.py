"""Progress output: a tqdm bar on a terminal, plain lines (no carriage returns) in a log."""

from __future__ import annotations

import io
import re

from deltatune.train.progress import Progress, is_interactive


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_count_postfix_rate_and_eta() -> None:
    log = io.StringIO()
    assert not is_interactive(log)
    with Progress(4, "lora sst2", unit="step", stream=log, interval=0.0) as bar:
        for i in range(4):
            bar.update(1, loss=f"0.{9 - i}00")
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # One line per update but the last (interval 0), then the closing line.
    assert len(lines) == 4
    assert re.fullmatch(r"lora sst2: 1/4 steps  loss 0\.900  \S+ steps/s  eta \d+:\d\d", lines[0])
    assert lines[2].startswith("lora sst2: 3/4 steps  loss 0.700  ")
    assert re.fullmatch(r"lora sst2: 4/4 steps  loss 0\.600  done in \d+:\d\d  \S+ steps/s", lines[3])


def test_lines_are_spaced_by_the_interval() -> None:
    log = io.StringIO()
    bar = Progress(1000, "eval", unit="example", stream=log, interval=3600.0)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval: 1000/1000 examples  done in ")


def test_a_resumed_count_starts_at_initial() -> None:
    log = io.StringIO()
    with Progress(10, "run", unit="step", initial=7, stream=log, interval=0.0) as bar:
        bar.update(1)
    assert log.getvalue().splitlines()[0].startswith("run: 8/10 steps")


def test_a_terminal_gets_the_redrawn_bar() -> None:
    term = Terminal()
    with Progress(5, "run", unit="step", stream=term) as bar:
        for _ in range(5):
            bar.update(1, loss="0.5")
    assert "\r" in term.getvalue() and "loss=0.5" in term.getvalue()


def test_disabled_prints_nothing() -> None:
    for stream in (io.StringIO(), Terminal()):
        with Progress(5, "run", stream=stream, interval=0.0, enabled=False) as bar:
            bar.update(5)
        assert stream.getvalue() == ""
