"""Evaluation metrics: :data:`METRICS`, by name (:func:`deltatune.train.tasks.compute` gives every
metric a task asks for).

All scores are on the 0-100 scale in which the papers report them (correlations on -100..100):
accuracy 91.2, Matthews correlation 63.4, BLEU 70.4, ... The classification and correlation metrics
need only numpy; BLEU needs ``sacrebleu`` and ROUGE-L ``rouge-score``, imported when first used.

=====================  ==================================================================================
name                   definition
=====================  ==================================================================================
``accuracy``           share of predicted class indices equal to the label
``f1``                 F1 of the positive class (1) in binary classification, as GLUE reports it for MRPC
``matthews``           Matthews correlation coefficient (multi-class form of Gorodkin 2004); 0 when
                       undefined (a constant prediction or label), as scikit-learn does
``pearson``            Pearson correlation of predicted and gold scores
``spearman``           Pearson correlation of the average ranks (ties share the mean of their ranks)
``bleu``               corpus BLEU (Papineni et al., ACL 2002) with several references per example, as
                       computed by sacreBLEU (Post, WMT 2018) with its default 13a tokenization
``rouge_l``            ROUGE-L F-measure (Lin, 2004), per example against its best reference, averaged
``exact_match``        share of generated texts equal to one of their references (outer whitespace aside)
``answer_accuracy``    GSM8K: share of outputs whose final number equals the reference's (see
                       :func:`extract_answer`)
=====================  ==================================================================================

A correlation is 0 when one side is constant, and NaN when a prediction is not finite.

Sources: GLUE (Wang et al., ICLR 2019) for the per-task metrics (Matthews correlation for CoLA,
F1/accuracy for MRPC, Pearson/Spearman for STS-B); E2E NLG (Novikova, Dušek & Rieser, SIGDIAL 2017)
for BLEU and ROUGE-L with multiple references (scores from sacreBLEU differ slightly from those of
the official e2e-metrics scripts, which tokenize differently); GSM8K (Cobbe et al., arXiv:2110.14168,
2021) for the ``#### <answer>`` convention and final-answer accuracy.

Example:
    >>> accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    75.0
    >>> round(spearman([1, 2, 2, 3], [1, 3, 2, 4]), 4)  # 100 * 3 / sqrt(10)
    94.8683
    >>> extract_answer("She pays 3 * $1,250 = $3,750.\\n#### 3,750")
    3750.0
    >>> extract_answer("So the answer is 42.")
    42.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # annotations only: this module imports nothing of the harness at run time
    from .data import Example

__all__ = [
    "METRICS",
    "accuracy",
    "answer_accuracy",
    "bleu",
    "exact_match",
    "extract_answer",
    "f1",
    "matthews",
    "pearson",
    "reference_answer",
    "rouge_l",
    "spearman",
]


def _pair(predictions: npt.ArrayLike, labels: npt.ArrayLike, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Both as flat arrays of ``dtype`` (``np.int64``: class indices, which must be whole numbers)."""
    arrays = []
    for what, values in (("predictions", predictions), ("labels", labels)):
        try:
            a = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be numbers") from None
        if dtype is np.int64:
            if not np.all(a == np.round(a)):  # also rejects NaN
                raise ValueError(f"{what} must be integer class indices, got e.g. {a[a != np.round(a)][0]}")
            a = a.astype(np.int64)
        arrays.append(a)
    p, y = arrays
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Percentage of ``predictions`` equal to ``labels`` (class indices)."""
    p, y = _pair(predictions, labels, np.int64)
    return 100.0 * float(np.mean(p == y))


def f1(predictions: npt.ArrayLike, labels: npt.ArrayLike, positive: int = 1) -> float:
    """F1 (x100) of class ``positive``: ``2 TP / (2 TP + FP + FN)``; 0 when there is no positive at all."""
    p, y = _pair(predictions, labels, np.int64)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denominator = 2 * tp + fp + fn
    return 100.0 * 2 * tp / denominator if denominator else 0.0


def matthews(predictions: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Matthews correlation coefficient (x100), any number of classes; 0 when undefined.

    With the confusion matrix ``C`` (rows: labels, columns: predictions), ``t = C.sum(1)``,
    ``q = C.sum(0)``, ``c = trace(C)``, ``s = C.sum()``:
    ``(c s - t.q) / sqrt((s^2 - q.q) (s^2 - t.t))``; for two classes this is
    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.
    """
    p, y = _pair(predictions, labels, np.int64)
    classes = np.union1d(p, y)
    confusion = np.zeros((classes.size, classes.size))
    np.add.at(confusion, (np.searchsorted(classes, y), np.searchsorted(classes, p)), 1.0)
    t, q = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = float(np.trace(confusion)), float(confusion.sum())
    denominator = math.sqrt((s * s - float(q @ q)) * (s * s - float(t @ t)))
    return 100.0 * (c * s - float(t @ q)) / denominator if denominator else 0.0


def pearson(predictions: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Pearson correlation (x100); 0 if either side is constant, NaN if a value is not finite."""
    x, y = _pair(predictions, labels, np.float64)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0.0:
        return 0.0
    return 100.0 * max(-1.0, min(1.0, float(dx @ dy) / denominator))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(predictions: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Spearman rank correlation (x100): Pearson of the average ranks; same conventions as :func:`pearson`."""
    x, y = _pair(predictions, labels, np.float64)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    return pearson(_average_ranks(x), _average_ranks(y))


def _check_texts(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {i}: references must be a non-empty list of strings, got {refs!r}")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) by sacreBLEU; ``references[i]`` are all references of ``hypotheses[i]``.

    The number of references may differ between examples.
    """
    _check_texts(hypotheses, references)
    import sacrebleu

    width = max(len(r) for r in references)
    # sacreBLEU takes one stream per reference position; None pads examples with fewer references.
    streams: list[list[str | None]] = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(width)
    ]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)  # type: ignore[arg-type]


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = False
) -> float:
    """ROUGE-L F-measure (x100) of each hypothesis against its best reference, averaged over examples.

    Uses ``rouge-score`` (lower-cases, splits on non-alphanumerics; Porter stemming if ``use_stemmer``).
    """
    _check_texts(hypotheses, references)
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [
        scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return 100.0 * float(np.mean(scores))


# A number: optional minus (not after a digit, so "5-3" gives 3), digits with optional thousands commas
# (not trailing: "1, 2" gives 1), optional decimals.
_NUMBER = re.compile(r"(?<![\d.])-?\d(?:[\d,]*\d)?(?:\.\d+)?")
_MARK = "####"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def reference_answer(text: str) -> float:
    """The GSM8K reference answer: the number after ``####``; ``ValueError`` if there is none."""
    _, mark, tail = text.partition(_MARK)
    match = _NUMBER.search(tail.replace("$", "")) if mark else None
    if match is None:
        raise ValueError(f"no '#### <number>' in GSM8K reference {text[-80:]!r}")
    return _number(match.group())


def extract_answer(text: str) -> float | None:
    """A model's final answer: the first number after the first ``####`` if there is one, else the last
    number in the text; commas and ``$`` are ignored. ``None`` if there is no number (where it looks)."""
    head, mark, tail = text.replace("$", "").partition(_MARK)
    if mark:
        match = _NUMBER.search(tail)
        return _number(match.group()) if match else None
    numbers = _NUMBER.findall(head)
    return _number(numbers[-1]) if numbers else None


def answer_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of ``predictions`` whose :func:`extract_answer` equals the :func:`reference_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    correct = 0
    for prediction, reference in zip(predictions, references, strict=True):
        answer = extract_answer(prediction)
        correct += answer is not None and math.isclose(answer, reference_answer(reference), abs_tol=1e-9)
    return 100.0 * correct / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage of ``predictions`` equal to one of their references, both stripped of outer whitespace."""
    _check_texts(predictions, references)
    pairs = zip(predictions, references, strict=True)
    hits = sum(p.strip() in {r.strip() for r in refs} for p, refs in pairs)
    return 100.0 * hits / len(predictions)


def _labels(examples: Sequence[Example]) -> list[Any]:
    labels = [ex.label for ex in examples]
    if any(label is None for label in labels):
        raise ValueError("every example needs a label for this metric")
    return labels


def _references(examples: Sequence[Example]) -> list[tuple[str, ...]]:
    out = []
    for i, ex in enumerate(examples):
        refs = ex.refs or ((ex.target,) if ex.target is not None else ())
        if not refs:
            raise ValueError(f"example {i} has no reference (neither refs nor target)")
        out.append(refs)
    return out


# name -> (function of predictions and examples)
METRICS: dict[str, Callable[[Sequence[Any], Sequence[Example]], float]] = {
    "accuracy": lambda p, e: accuracy(p, _labels(e)),
    "f1": lambda p, e: f1(p, _labels(e)),
    "matthews": lambda p, e: matthews(p, _labels(e)),
    "pearson": lambda p, e: pearson(p, _labels(e)),
    "spearman": lambda p, e: spearman(p, _labels(e)),
    "bleu": lambda p, e: bleu(p, _references(e)),
    "rouge_l": lambda p, e: rouge_l(p, _references(e)),
    "answer_accuracy": lambda p, e: answer_accuracy(p, [refs[0] for refs in _references(e)]),
    "exact_match": lambda p, e: exact_match(p, _references(e)),
}
