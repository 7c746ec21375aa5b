"""Tasks: what a data set looks like and how it is judged; the built-in table :data:`TASKS`.

A :class:`Task` names its input columns, its label, its kind of problem and the metrics that judge it
(names from :data:`deltatune.train.metrics.METRICS`); its ``loader`` turns files into a list of
:class:`~deltatune.train.data.Example` (:mod:`deltatune.train.data` reads the files). Every task has
two splits, ``"train"`` and ``"eval"``: :func:`load_split` gives a split's examples, :func:`compute`
every metric of the task for a list of predictions.

===========  ==============  ======================================  =============================
task         kind            files (train / eval)                    metrics (main first)
===========  ==============  ======================================  =============================
``sst2``     classification  glue/SST-2/train.tsv / dev.tsv          accuracy
``cola``     classification  glue/CoLA/train.tsv / dev.tsv           matthews, accuracy
``mrpc``     classification  glue/MRPC/train.tsv / dev.tsv           accuracy, f1
``rte``      classification  glue/RTE/train.tsv / dev.tsv            accuracy
``wnli``     classification  glue/WNLI/train.tsv / dev.tsv           accuracy
``stsb``     regression      glue/STS-B/train.tsv / dev.tsv          pearson, spearman
``agnews``   classification  agnews/dev.tsv / test.tsv               accuracy
``e2e``      generation      e2e/devset.csv / testset_w_refs.csv     bleu, rouge_l
``gsm8k``    generation      gsm8k/train.jsonl / test.jsonl          answer_accuracy
===========  ==============  ======================================  =============================

The GLUE "dev" files are the evaluation split (GLUE's test labels are not public). The full AG News
and E2E training sets are not in ``shared/datasets``; ``agnews`` trains on its 10,001-example dev
file (drawn from the AG train split) and ``e2e`` on the E2E development set.

Sources:

* GLUE: Wang, Singh, Michael, Hill, Levy & Bowman, "GLUE: A Multi-Task Benchmark and Analysis
  Platform for Natural Language Understanding", ICLR 2019. Its tasks: SST-2 (Socher et al., EMNLP
  2013), CoLA (Warstadt, Singh & Bowman, TACL 2019), MRPC (Dolan & Brockett, IWP 2005), RTE
  (Dagan et al. 2006 and successors), STS-B (Cer et al., SemEval 2017), WNLI (Levesque, Davis &
  Morgenstern, KR 2012). Label orders follow the GLUE distribution.
* AG News: Zhang, Zhao & LeCun, "Character-level Convolutional Networks for Text Classification",
  NeurIPS 2015 (classes in its order: World, Sports, Business, Sci/Tech).
* E2E: Novikova, Dušek & Rieser, "The E2E Dataset: New Challenges For End-to-End Generation",
  SIGDIAL 2017. Each meaning representation (MR) has several human references; for evaluation the
  references are grouped by MR.
* GSM8K: Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168, 2021.
  The answer text ends with ``#### <final answer>``.

Example:
    >>> sorted(TASKS)
    ['agnews', 'cola', 'e2e', 'gsm8k', 'mrpc', 'rte', 'sst2', 'stsb', 'wnli']
    >>> t = TASKS["rte"]
    >>> t.kind, t.text_fields, t.label_names, t.num_labels, t.main_metric
    ('classification', ('sentence1', 'sentence2'), ('entailment', 'not_entailment'), 2, 'accuracy')
    >>> get_task("mnli")
    Traceback (most recent call last):
    ...
    ValueError: unknown task 'mnli'; known tasks: agnews, cola, e2e, gsm8k, mrpc, rte, sst2, stsb, wnli
    >>> gold = [Example(("a",), 1), Example(("b",), 0), Example(("c",), 1), Example(("d",), 1)]
    >>> compute("sst2", [1, 0, 0, 1], gold)
    {'accuracy': 75.0}
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .data import (
    KINDS,
    SPLITS,
    Example,
    Kind,
    Loader,
    Picked,
    Split,
    data_root,
    files_loader,
    infer_label_names,
    load_file,
)
from .metrics import METRICS

__all__ = ["EVAL_SAMPLE_SEED", "TASKS", "Task", "compute", "get_task", "hold_out", "load_split", "sample"]

#: The shuffle that draws a limited evaluation sample (``eval_limit``): one draw for every seed and
#: method, so that runs compared with each other are judged on the same examples.
EVAL_SAMPLE_SEED = 0
#: The shuffle that holds a validation set out of the training examples (``validation``).
VALIDATION_SEED = 1234


@dataclass(frozen=True)
class Task:
    """What a data set looks like and how it is judged.

    Attributes:
        name: Registry key.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        text_fields: The input columns, in order.
        label_field: The label column (the target text column for generation).
        label_names: Class names, index = class id (classification only; empty otherwise).
        metrics: Names from :data:`deltatune.train.metrics.METRICS`.
        main_metric: The one to select checkpoints by; one of ``metrics``.
        loader: ``loader(split, data_dir) -> list[Example]``, ``split`` being ``"train"`` or ``"eval"``.
        description: One line for humans.
        fmt: For a task on the user's files (:mod:`deltatune.train.userdata`), their format
            (``messages``, ``prompt_completion``, ``text``, ``classification``, ``regression``); None
            for the built-in tasks.
    """

    name: str
    kind: Kind
    text_fields: tuple[str, ...]
    label_field: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    loader: Loader = field(repr=False, compare=False)
    description: str = ""
    fmt: str | None = None

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.text_fields:
            raise ValueError(f"{where}: text_fields is empty")
        if self.kind == "classification" and len(self.label_names) < 2:
            raise ValueError(f"{where}: a classification task needs at least two label_names")
        if self.kind != "classification" and self.label_names:
            raise ValueError(f"{where}: label_names only make sense for classification")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"{where}: unknown metric(s) {unknown}; known: {', '.join(sorted(METRICS))}")
        if self.main_metric not in self.metrics and self.main_metric != "loss":
            raise ValueError(f"{where}: main_metric {self.main_metric!r} is not in metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        """Number of outputs of a classification/regression head: classes, 1 (regression), 0 (generation)."""
        if self.kind == "classification":
            return len(self.label_names)
        return 1 if self.kind == "regression" else 0

    def load(
        self,
        split: Split,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> Sequence[Example]:
        """Same as :func:`load_split` with this task."""
        return load_split(self, split, data_dir=data_dir, limit=limit, seed=seed)

    @classmethod
    def from_file(
        cls,
        name: str,
        train_file: str | os.PathLike[str],
        eval_file: str | os.PathLike[str],
        text_fields: Sequence[str],
        label_field: str,
        kind: Kind,
        *,
        label_names: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        main_metric: str | None = None,
        group_eval_refs: bool = False,
        description: str = "",
    ) -> Task:
        """A task on the user's own files (CSV, TSV or JSONL, chosen by extension; see :func:`load_file`).

        The paths are used as given (relative paths are relative to the working directory); the
        ``data_dir`` passed at load time is ignored. For classification without ``label_names`` the
        classes are read from the training file: ``0..max`` if every label is a non-negative integer,
        else the distinct values in sorted order. Default metrics: accuracy, plus F1 and Matthews
        correlation for two classes (classification); Pearson and Spearman (regression); BLEU and
        ROUGE-L (generation). With ``group_eval_refs`` the evaluation examples of a generation task
        that share the same input become one example with all their references (as for E2E).
        """
        train_path, eval_path = Path(train_file), Path(eval_file)
        fields = tuple(text_fields)
        if kind == "classification" and label_names is None:
            label_names = infer_label_names(train_path, fields, label_field)
        names = tuple(label_names or ())
        if metrics is None:
            metrics = _default_metrics(kind, len(names))
        metrics = tuple(metrics)
        if not metrics:
            raise ValueError(f"task {name!r}: metrics is empty")

        def loader(split: Split, data_dir: Path) -> Sequence[Example]:
            path = train_path if split == "train" else eval_path
            return load_file(
                path,
                fields,
                label_field,
                kind,
                label_names=names,
                group_refs=group_eval_refs and split == "eval",
            )

        return cls(
            name=name,
            kind=kind,
            text_fields=fields,
            label_field=label_field,
            label_names=names,
            metrics=metrics,
            main_metric=main_metric or metrics[0],
            loader=loader,
            description=description or f"{kind} task on {train_path} / {eval_path}",
        )


def _default_metrics(kind: Kind, num_classes: int) -> tuple[str, ...]:
    if kind == "classification":
        return ("accuracy", "f1", "matthews") if num_classes == 2 else ("accuracy",)
    if kind == "regression":
        return ("pearson", "spearman")
    return ("bleu", "rouge_l")


# ----------------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------------


def _glue(
    name: str,
    folder: str,
    text_fields: tuple[str, ...],
    label_field: str,
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    description: str,
    *,
    fieldnames: tuple[str, ...] | None = None,
) -> Task:
    kind: Kind = "classification" if label_names else "regression"
    files: dict[Split, str] = {"train": f"glue/{folder}/train.tsv", "eval": f"glue/{folder}/dev.tsv"}
    return Task(
        name=name,
        kind=kind,
        text_fields=text_fields,
        label_field=label_field,
        label_names=label_names,
        metrics=metrics,
        main_metric=metrics[0],
        loader=files_loader(name, files, text_fields, label_field, kind, label_names, fieldnames=fieldnames),
        description=description,
    )


def _make_tasks() -> dict[str, Task]:
    tasks = [*_glue_tasks(), _agnews(), *_generation_tasks()]
    return {t.name: t for t in sorted(tasks, key=lambda t: t.name)}


def _glue_tasks() -> list[Task]:
    """The GLUE tasks (Wang et al.): SST-2, CoLA, MRPC, RTE, WNLI and STS-B."""
    return [
        _glue(
            "sst2",
            "SST-2",
            ("sentence",),
            "label",
            ("negative", "positive"),
            ("accuracy",),
            "GLUE SST-2: movie-review sentence sentiment (binary)",
        ),
        _glue(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("unacceptable", "acceptable"),
            ("matthews", "accuracy"),
            "GLUE CoLA: grammatical acceptability (binary, Matthews correlation)",
            fieldnames=("source", "label", "original_label", "sentence"),
        ),
        _glue(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "GLUE MRPC: paraphrase detection (sentence pairs)",
        ),
        _glue(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            "GLUE RTE: textual entailment (sentence pairs)",
        ),
        _glue(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("not_entailment", "entailment"),
            ("accuracy",),
            "GLUE WNLI: Winograd-schema entailment (sentence pairs)",
        ),
        _glue(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            (),
            ("pearson", "spearman"),
            "GLUE STS-B: semantic similarity score 0..5 (regression)",
        ),
    ]


def _agnews() -> Task:
    """AG News topic classification (4 classes)."""
    agnews_names = ("World", "Sports", "Business", "Sci/Tech")
    agnews_files: dict[Split, str] = {"train": "agnews/dev.tsv", "eval": "agnews/test.tsv"}
    return Task(
        name="agnews",
        kind="classification",
        text_fields=("text",),
        label_field="label",
        label_names=agnews_names,
        metrics=("accuracy",),
        main_metric="accuracy",
        loader=files_loader(
            "agnews",
            agnews_files,
            ("text",),
            "label",
            "classification",
            agnews_names,
            fieldnames=("text", "label"),
        ),
        description="AG News: news topic (4 classes); trains on the 10,001-example dev file",
    )


def _generation_tasks() -> list[Task]:
    """E2E NLG (text from restaurant meaning representations, several references per input) and
    GSM8K (grade-school math, scored on the final answer)."""
    e2e: dict[Split, str] = {"train": "e2e/devset.csv", "eval": "e2e/testset_w_refs.csv"}
    gsm8k: dict[Split, str] = {"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl"}
    return [
        _generation(
            "e2e",
            e2e,
            ("mr", "ref"),
            ("bleu", "rouge_l"),
            "E2E NLG: restaurant meaning representation -> text; trains on the dev set",
            group_eval_refs=True,
        ),
        _generation(
            "gsm8k",
            gsm8k,
            ("question", "answer"),
            ("answer_accuracy",),
            "GSM8K: grade-school math word problems; the answer ends with '#### <number>'",
        ),
    ]


def _generation(
    name: str,
    files: dict[Split, str],
    columns: tuple[str, str],
    metrics: tuple[str, ...],
    description: str,
    **loader_kw: Any,
) -> Task:
    """A generation task on local files: ``columns`` (prompt, reference), the first metric the main one."""
    text, label = columns
    return Task(
        name=name,
        kind="generation",
        text_fields=(text,),
        label_field=label,
        label_names=(),
        metrics=metrics,
        main_metric=metrics[0],
        loader=files_loader(name, files, (text,), label, "generation", **loader_kw),
        description=description,
    )


#: The built-in tasks by name.
TASKS: dict[str, Task] = _make_tasks()


def get_task(task: str | Task) -> Task:
    """``TASKS[task]`` with a helpful error; a :class:`Task` is returned as is."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def load_split(
    task: str | Task,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> Sequence[Example]:
    """The examples of one split (``"train"`` or ``"eval"``) of a task.

    Args:
        task: A name from :data:`TASKS` or a :class:`Task`.
        split: ``"train"`` or ``"eval"``.
        data_dir: The data directory (default: ``$DELTATUNE_DATA``, else :data:`DEFAULT_DATA_DIR`).
        limit: Keep at most this many examples: the first ``limit`` in file order, or, with ``seed``,
            the first ``limit`` of a shuffle seeded by ``seed`` (deterministic; a smaller limit gives a
            prefix of a larger one). ``seed`` without ``limit`` changes nothing.
        seed: See ``limit``.
    """
    t = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(map(repr, SPLITS))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return sample(t.loader(split, data_root(data_dir)), limit, seed)


def sample(examples: Sequence[Example], limit: int | None, seed: int | None = None) -> Sequence[Example]:
    """At most ``limit`` of ``examples``: the first ones, or with ``seed`` the first of a shuffle seeded
    by it (a smaller limit gives a prefix of a larger one); all of them where ``limit`` is None."""
    if limit is None:
        return examples
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if seed is None:
        return examples[:limit]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:limit]]


def hold_out(examples: Sequence[Example], n: int, what: str) -> tuple[Sequence[Example], list[Example]]:
    """``examples`` split into the rest and ``n`` held out for validation (model selection: learning
    rates, steps), drawn by a fixed shuffle (:data:`VALIDATION_SEED`), not by the run's seed, so that
    every run of a comparison selects on the same examples. Order is kept on both sides; the rest is a
    view, read on access (a memory-mapped table is not read whole to split it). ``what`` names the
    data in the error when ``n`` leaves too little to train on."""
    if n >= len(examples):
        raise ValueError(
            f"TrainConfig.validation: {what} has {len(examples)} training examples; holding out {n} leaves "
            "none to train on. Hold out fewer (--validation)"
        )
    order = list(range(len(examples)))
    random.Random(VALIDATION_SEED).shuffle(order)
    held = set(order[:n])
    rest = [i for i in range(len(examples)) if i not in held]
    return Picked(examples, rest), [examples[i] for i in sorted(held)]


def _as_sequence(predictions: Sequence[Any] | npt.NDArray[Any]) -> Sequence[Any]:
    if isinstance(predictions, np.ndarray):
        return list(predictions.reshape(-1).tolist())
    return predictions


def compute(
    task: str | Task, predictions: Sequence[Any] | npt.NDArray[Any], examples: Sequence[Example]
) -> dict[str, float]:
    """Every metric of ``task`` (in its order) for ``predictions`` on ``examples``.

    ``predictions`` are class indices (classification), numbers (regression) or texts (generation),
    one per example.
    """
    t = get_task(task)
    preds = _as_sequence(predictions)
    if len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples of task {t.name!r}")
    if t.kind == "generation" and not all(isinstance(p, str) for p in preds):
        raise ValueError(f"task {t.name!r} is generation: predictions must be strings")
    return {name: METRICS[name](preds, examples) for name in t.metrics}
