"""Metrics against values worked out by hand, and :func:`compute` per task kind."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from deltatune.train import metrics as metrics_module
from deltatune.train.data import Example
from deltatune.train.metrics import (
    METRICS,
    _average_ranks,
    accuracy,
    answer_accuracy,
    bleu,
    extract_answer,
    f1,
    matthews,
    pearson,
    reference_answer,
    rouge_l,
    spearman,
)
from deltatune.train.tasks import TASKS, compute


def confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[list[int], list[int]]:
    """(predictions, labels) with these binary counts."""
    predictions = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    return predictions, labels


# ----------------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------------


def test_accuracy_and_f1() -> None:
    p, y = confusion(tp=2, tn=5, fp=1, fn=1)
    assert accuracy(p, y) == pytest.approx(100 * 7 / 9)
    assert f1(p, y) == pytest.approx(100 * 2 * 2 / (2 * 2 + 1 + 1))  # precision = recall = 2/3
    assert f1(p, y, positive=0) == pytest.approx(100 * 2 * 5 / (2 * 5 + 1 + 1))
    assert f1([0, 0], [0, 0]) == 0.0  # no positive anywhere
    assert accuracy(np.array([[1], [2]]), (1, 0)) == 50.0  # arrays of any shape are flattened


def test_matthews_binary() -> None:
    p, y = confusion(tp=6, tn=3, fp=1, fn=2)
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (18 - 2) / sqrt(7 * 8 * 4 * 5)
    assert matthews(p, y) == pytest.approx(100 * 16 / math.sqrt(1120))
    assert matthews(y, y) == 100.0
    assert matthews([1 - v for v in y], y) == -100.0
    assert matthews([1] * len(y), y) == 0.0  # undefined -> 0


def test_matthews_multiclass() -> None:
    # confusion (rows: labels 0,1,2; columns: predictions) [[1,1,0],[0,2,0],[1,0,1]]:
    # t = [2,2,2], q = [2,3,1], c = 4, s = 6 -> (24 - 12) / sqrt((36 - 14)(36 - 12))
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    assert matthews(p, y) == pytest.approx(100 * 12 / math.sqrt(22 * 24))
    # labels need not be 0..k-1
    assert matthews([7, 9, 9, 9, 11, 7], [7, 7, 9, 9, 11, 11]) == pytest.approx(100 * 12 / math.sqrt(22 * 24))


def test_class_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions to score"):
        matthews([], [])
    with pytest.raises(ValueError, match=r"predictions must be integer class indices, got e\.g\. 0\.5"):
        f1([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="predictions must be numbers"):
        accuracy(["a"], [0])


# ----------------------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------------------


def test_pearson() -> None:
    # x = [1,2,3], y = [2,4,7]: cov sum 5, var sums 2 and 114/9 -> 5 / sqrt(2 * 114 / 9) = 15 / sqrt(228)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(100 * 15 / math.sqrt(228))
    assert pearson([1, 2, 3], [30, 20, 10]) == pytest.approx(-100.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant -> 0
    assert math.isnan(pearson([1, float("nan"), 3], [1, 2, 3]))


def test_average_ranks() -> None:
    assert _average_ranks(np.array([10.0, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]
    assert _average_ranks(np.array([3.0, 1, 2])).tolist() == [3, 1, 2]
    assert _average_ranks(np.array([5.0, 5, 5, 5])).tolist() == [2.5] * 4


def test_spearman_with_ties() -> None:
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: deviations [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]
    # -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(100 * 3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(100.0)  # monotone, not linear
    assert spearman([4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(-100.0)
    assert spearman([2, 2, 2], [1, 2, 3]) == 0.0
    assert math.isnan(spearman([1, float("inf"), 3], [1, 2, 3]))


# ----------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------


def test_bleu() -> None:
    pytest.importorskip("sacrebleu")
    assert bleu(
        ["the cat sat on the mat", "a dog ran"], [["the cat sat on the mat"], ["a dog ran"]]
    ) == pytest.approx(100.0)
    # every n-gram matches; only the brevity penalty exp(1 - 7/6) applies
    long_ref = "the cat sat on the mat today"
    assert bleu(["the cat sat on the mat"], [[long_ref]]) == pytest.approx(100 * math.exp(-1 / 6), abs=1e-9)
    # with a second reference of the same length, the closest length is 6: no penalty
    assert bleu(["the cat sat on the mat"], [[long_ref, "the cat sat on the mat"]]) == pytest.approx(100.0)
    # references may vary in number per example
    assert bleu(["x y z w", "a b c d"], [["x y z w"], ["q", "a b c d", "r"]]) == pytest.approx(100.0)
    assert bleu(["nothing in common here"], [["the cat sat on the mat"]]) == 0.0
    with pytest.raises(ValueError, match="references must be a non-empty list of strings"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="2 hypotheses for 1 reference lists"):
        bleu(["a", "b"], [["a"]])


def test_rouge_l() -> None:
    pytest.importorskip("rouge_score")
    # LCS 5 of 5 predicted and 6 reference tokens: P = 1, R = 5/6, F = 10/11
    assert rouge_l(["the cat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100 * 10 / 11)
    # the best reference counts; the mean is over examples
    refs = [["nothing alike", "the cat sat on the mat"], ["A dog."]]
    assert rouge_l(["the cat on the mat", "a DOG"], refs) == pytest.approx(100 * (10 / 11 + 1) / 2)
    assert rouge_l(["running dogs"], [["run dog"]]) == 0.0
    assert rouge_l(["running dogs"], [["run dog"]], use_stemmer=True) == pytest.approx(100.0)


def test_gsm8k_answer_extraction() -> None:
    assert reference_answer("3 + 4 = <<3+4=7>>7\n#### 7") == 7.0
    assert reference_answer("...\n#### 1,080") == 1080.0
    assert reference_answer("#### -12") == -12.0
    with pytest.raises(ValueError, match="no '#### <number>' in GSM8K reference"):
        reference_answer("the answer is 7")
    assert extract_answer("#### $1,234.50") == 1234.5
    assert extract_answer("She has 3 apples, then 5, so 8 in all.") == 8.0  # last number
    assert extract_answer("It costs $2,125.") == 2125.0
    assert extract_answer("#### 18\n\nQuestion: what is 2 + 3?\nAnswer: #### 5") == 18.0  # first after ####
    assert extract_answer("5-3 = 2, and the loss is -4") == -4.0
    assert extract_answer("1, 2, and 3") == 3.0  # a trailing comma is not part of the number
    assert extract_answer("I don't know") is None
    assert extract_answer("12 apples. #### none") is None  # after #### only


def test_answer_accuracy() -> None:
    refs = ["... #### 18", "... #### 3", "... #### 7", "... #### 1,000"]
    predictions = ["#### 18", "The answer is 3.00.", "I don't know", "so 1000"]
    assert answer_accuracy(predictions, refs) == 75.0
    with pytest.raises(ValueError, match="1 predictions for 4 references"):
        answer_accuracy(["#### 1"], refs)


# ----------------------------------------------------------------------------------------------------
# compute
# ----------------------------------------------------------------------------------------------------


def test_compute_classification_and_regression() -> None:
    examples = [Example(("s",), label) for label in (1, 0, 1, 1)]
    assert compute("sst2", [1, 0, 0, 1], examples) == {"accuracy": 75.0}
    cola = compute(TASKS["cola"], np.array([1, 0, 0, 1]), examples)
    assert list(cola) == ["matthews", "accuracy"]  # the task's order
    assert cola["matthews"] == pytest.approx(100 * (2 * 1 - 0 * 1) / math.sqrt(2 * 3 * 1 * 2))
    mrpc = compute("mrpc", [1, 0, 0, 1], examples)
    assert mrpc == {"accuracy": 75.0, "f1": pytest.approx(80.0)}
    scored = [Example(("a", "b"), score) for score in (1.0, 2.0, 2.0, 3.0)]
    stsb = compute("stsb", [1, 3, 2, 4], scored)
    assert stsb["spearman"] == pytest.approx(100 * 3 / math.sqrt(10))


def test_compute_generation() -> None:
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    examples = [
        Example(("name[A]",), None, "A is a pub.", ("A is a pub.", "There is a pub called A.")),
        Example(("name[B]",), None, "B serves food.", ("B serves food.",)),
    ]
    assert compute("e2e", ["There is a pub called A.", "B serves food."], examples) == {
        "bleu": pytest.approx(100.0),
        "rouge_l": 100.0,
    }
    # an example with only a target is scored against it
    assert compute("e2e", ["x y"], [Example(("m",), None, "x y")])["rouge_l"] == 100.0


def test_compute_errors() -> None:
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        compute("glue", [1], [Example(("a",), 1)])
    with pytest.raises(ValueError, match="2 predictions for 1 examples of task 'sst2'"):
        compute("sst2", [1, 0], [Example(("a",), 1)])
    with pytest.raises(ValueError, match="task 'gsm8k' is generation: predictions must be strings"):
        compute("gsm8k", [18], [Example(("q",), None, "#### 18")])
    with pytest.raises(ValueError, match="every example needs a label"):
        compute("sst2", [1], [Example(("a",))])
    with pytest.raises(ValueError, match="example 0 has no reference"):
        compute("gsm8k", ["#### 1"], [Example(("q",))])


def test_every_task_metric_exists() -> None:
    for task in TASKS.values():
        assert set(task.metrics) <= set(METRICS)


def test_imports_without_optional_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    spec = importlib.util.spec_from_file_location("metrics_copy", metrics_module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # the module itself imports fine
    assert fresh.accuracy([1], [1]) == 100.0
    with pytest.raises(ImportError):
        fresh.bleu(["a"], [["a"]])
    with pytest.raises(ImportError):
        fresh.rouge_l(["a"], [["a"]])
