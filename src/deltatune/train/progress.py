"""Progress for a person at a terminal and for a log file, from one object.

On a terminal (or in a notebook) this is a tqdm bar, redrawn in place. Anywhere else (CI, ``| tee``,
``> run.log``) tqdm's carriage-return redraws pile up into one line of hundreds of kilobytes, so
there it prints a plain line at most every ``interval`` seconds and one when it closes::

    lora sst2: 120/250 steps  loss 0.4120  2.1 steps/s  eta 1:02
    lora sst2: 250/250 steps  loss 0.3080  done in 1:58  2.1 steps/s

Inside :func:`quiet_transformers` transformers prints neither its own weight-loading bar nor its load
report, so that the harness's output is its own (the harness reports missing weights itself).

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> with Progress(3, "demo", unit="step", stream=log) as p:
    ...     for _ in range(3):
    ...         p.update(loss="0.5")
    >>> log.getvalue().startswith("demo: 3/3 steps  loss 0.5  done in 0:00")
    True
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TextIO

DEFAULT_INTERVAL_S = 5.0


def is_interactive(stream: TextIO) -> bool:
    """Whether ``stream`` shows a redrawn bar well: a terminal, or a Jupyter kernel (tqdm's widget)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        tty = False
    return bool(tty) or "ipykernel" in sys.modules


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Count ``total`` units of work: a tqdm bar on a terminal, plain lines elsewhere.

    Args:
        total: units in all (steps, examples).
        desc: what is counted, printed first.
        unit: the unit's name, singular ("step", "example").
        initial: units already done (a resumed run).
        enabled: False prints nothing at all.
        stream: where to write (default ``sys.stderr`` at construction).
        interval: least seconds between two plain lines.
        leave: keep the bar on screen when it closes (terminal only).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        leave: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = self.initial = initial
        self.enabled = enabled
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.interval = interval
        self.postfix: dict[str, str] = {}
        self._bar: Any = None
        self._started = self._printed = time.monotonic()
        self._closed = False
        if enabled and is_interactive(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=self.stream
            )

    def update(self, n: int = 1, **postfix: str) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss="0.412"``) is shown after the count."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._printed >= self.interval and self.n < self.total:
            self._printed = now
            rate = self._rate(now)
            eta = _clock((self.total - self.n) / rate) if rate > 0 else "?"
            self._line(f"{self._rate_text(rate)}  eta {eta}")

    def close(self) -> None:
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self.n > self.initial:
            now = time.monotonic()
            self._line(f"done in {_clock(now - self._started)}  {self._rate_text(self._rate(now))}")

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def _rate_text(self, rate: float) -> str:
        return f"{rate:.3g} {self.unit}s/s"

    def _line(self, tail: str) -> None:
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(tail)
        print("  ".join(parts), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Drop transformers' load report and its weight-loading progress bar while models load."""
    from transformers.utils import logging as hf_logging

    names = ("transformers.modeling_utils", "transformers.utils.loading_report")
    loggers = [logging.getLogger(n) for n in names]
    flt = _DropLoadReport()
    for lg in loggers:
        lg.addFilter(flt)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        for lg in loggers:
            lg.removeFilter(flt)
