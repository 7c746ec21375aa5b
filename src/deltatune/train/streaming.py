"""``deltatune train --data PATH --streaming true``: train while the file is read, never converting it first.

The training file is read as a ``datasets.IterableDataset`` and tokenised a thousand rows at a time as
training consumes it (the :class:`~deltatune.train.formats.Encoder` of the non-streamed path, so the
masks and truncation are the same), so the first step starts after one window of examples, not after a
pass over the whole file, and nothing is written to the cache. The price: no pass over the file
beforehand, so the format is told from its first rows and a bad row further on stops the run when it
is reached (named by its row, as always); the held-out data must be a separate ``--eval-data`` file;
a resumed run reads and tokenises again the examples it had consumed.

Order: each epoch reads the file in order, shuffles it through a seeded buffer (``buffer`` examples) and,
with ``group_by_length``, sorts windows of ``window`` global batches by length before cutting them into
batches, whose order within the window is shuffled. Each epoch sees every example once.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from .data import Example
from .formats import Encoder, targets_of
from .sources import explain

__all__ = ["StreamedExamples"]

_ROWS_PER_CALL = 1000  # rows tokenised per Encoder call


class StreamedExamples:
    """The training examples of a streamed file, in global batches (:meth:`batches`)."""

    def __init__(
        self,
        stream: Any,
        files: list[Path],
        encoder: Encoder,
        *,
        seed: int,
        limit: int | None = None,
        buffer: int = 2_000,
    ) -> None:
        self.stream = stream
        self.files = files
        self.encoder = encoder
        self.seed = seed
        self.limit = limit
        self.buffer = buffer
        #: Over the rows read in the first epoch (so far): examples, truncated, skipped.
        self.report = {"examples": 0, "truncated": 0, "skipped": 0}
        self._counted = False  # a first epoch was read to its end: the report is complete
        #: Mean target tokens per example, estimated from the first shuffle buffer (``buffer``
        #: examples, or the whole file if smaller) once it is read.
        self.mean_targets: float | None = None

    def _encoded(self, epoch: int) -> Iterator[Example]:
        """The file's examples in order, tokenised; skipped ones dropped (and counted, first epoch)."""
        rows = iter(self.stream if self.limit is None else self.stream.take(self.limit))
        index = 0
        counting = epoch == 0 and not self._counted
        if counting:
            self.report = dict.fromkeys(self.report, 0)
        while True:
            try:
                chunk = list(islice(rows, _ROWS_PER_CALL))
            except ValueError:
                raise
            except Exception as e:  # the reader's own errors: name the file and line where possible
                raise explain(e, self.files, self.encoder.where.split(" row ")[0]) from None
            if not chunk:
                self._counted = self._counted or counting
                return
            keys = dict.fromkeys(k for row in chunk for k in row)
            batch = {k: [row.get(k) for row in chunk] for k in keys}
            out = self.encoder(batch, list(range(index, index + len(chunk))))
            index += len(chunk)
            for ids, labels, status in zip(out["input_ids"], out["labels"], out["status"], strict=True):
                if counting:
                    self.report["examples"] += 1
                    self.report["truncated"] += status == 1
                    self.report["skipped"] += status == 2
                if status != 2:
                    yield Example(("",), None, "", ("",), tokens=(array("i", ids), array("i", labels)))

    def _shuffled(self, epoch: int) -> Iterator[Example]:
        """A seeded shuffle through a buffer of ``self.buffer`` examples."""
        rng = random.Random(self.seed * 100_003 + epoch)
        pool: list[Example] = []
        for example in self._encoded(epoch):
            if len(pool) < self.buffer:
                pool.append(example)
                if len(pool) == self.buffer:
                    self._estimate(pool)
                continue
            i = rng.randrange(len(pool))
            yield pool[i]
            pool[i] = example
        self._estimate(pool)
        rng.shuffle(pool)
        yield from pool

    def _estimate(self, pool: list[Example]) -> None:
        if self.mean_targets is None and pool:
            counts = [targets_of(e.tokens[1]) for e in pool if e.tokens]
            self.mean_targets = max(sum(counts) / len(counts), 1.0)

    def batches(
        self, start: int, global_batch: int, group: bool, window: int = 64
    ) -> Iterator[list[Example]]:
        """Global batches from step ``start`` on (the earlier ones are read and dropped), epoch after
        epoch."""
        step = 0
        epoch = 0
        pending: list[Example] = []
        while True:
            before = step
            size = global_batch * (window if group else 1)
            source = self._shuffled(epoch)
            while True:
                taken = list(islice(source, size - len(pending)))
                pending.extend(taken)
                if len(pending) < size and taken:
                    continue
                if len(pending) < global_batch:
                    break  # the epoch's tail joins the next epoch's first batch
                cut = len(pending) - len(pending) % global_batch
                ready, pending = pending[:cut], pending[cut:]
                if group:
                    ready.sort(key=lambda e: -len(e.tokens[0]) if e.tokens else 0)
                order = [ready[b : b + global_batch] for b in range(0, len(ready), global_batch)]
                if group:
                    random.Random(self.seed * 7_919 + epoch * 131 + step).shuffle(order)
                for batch in order:
                    if step >= start:
                        yield batch
                    step += 1
                if not taken:
                    break
            if step == before and epoch > 0 and self.report["examples"] == self.report["skipped"]:
                raise ValueError(
                    f"{self.encoder.where}: no example left to train on (every one is skipped at "
                    f"--max-length {self.encoder.max_length}, or the file holds fewer than a batch)"
                )
            epoch += 1
