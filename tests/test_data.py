"""Tasks and data loading: the real files in shared/datasets, user files, and every input error."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from deltatune.train.data import DEFAULT_DATA_DIR, Example, Split, data_root, load_file
from deltatune.train.metrics import METRICS, answer_accuracy, reference_answer
from deltatune.train.tasks import TASKS, Task, compute, get_task, load_split

DATA = data_root()
needs_data = pytest.mark.skipif(
    not (DATA / "SOURCES.md").is_file(),
    reason=f"data sets not found at {DATA}: put them in ../shared/datasets next to the repository "
    "or set DELTATUNE_DATA",
)

# Example counts (train, eval) as SOURCES.md gives them; e2e eval counts meaning representations.
COUNTS: dict[str, tuple[int, int]] = {
    "sst2": (67_349, 872),
    "cola": (8_551, 1_043),
    "mrpc": (3_667, 408),
    "rte": (2_490, 277),
    "stsb": (5_749, 1_500),
    "wnli": (635, 71),
    "agnews": (10_001, 7_600),
    "e2e": (4_672, 630),
    "gsm8k": (7_473, 1_319),
}


@functools.cache
def real(task: str, split: Split) -> list[Example]:
    """Each real split is read once per test session."""
    return load_split(task, split)


# ----------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(TASKS) == set(COUNTS)
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task and get_task(task) is task
        assert task.main_metric in task.metrics and set(task.metrics) <= set(METRICS)
    assert {n: t.kind for n, t in TASKS.items() if t.kind != "classification"} == {
        "stsb": "regression",
        "e2e": "generation",
        "gsm8k": "generation",
    }
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")  # GLUE order
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["agnews"].label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert [TASKS[n].num_labels for n in ("sst2", "agnews", "stsb", "e2e")] == [2, 4, 1, 0]
    assert TASKS["cola"].main_metric == "matthews" and TASKS["stsb"].main_metric == "pearson"
    assert TASKS["e2e"].metrics == ("bleu", "rouge_l") and TASKS["gsm8k"].metrics == ("answer_accuracy",)


def test_default_data_dir_is_next_to_the_repository() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert repo.parent / "shared" / "datasets" == DEFAULT_DATA_DIR


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DELTATUNE_DATA", raising=False)
    assert data_root() == DEFAULT_DATA_DIR
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"


# ----------------------------------------------------------------------------------------------------
# the real files
# ----------------------------------------------------------------------------------------------------


@needs_data
def test_counts_are_those_of_sources_md() -> None:
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    for name, (n_train, n_eval) in COUNTS.items():
        if name == "e2e":  # SOURCES.md gives refs / MRs per file
            assert "4,672 refs / 547 MRs; 4,693 refs / 630 MRs" in sources
        else:
            assert f"{n_train:,} / {n_eval:,}" in sources, name


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_row_counts(name: str) -> None:
    task = TASKS[name]
    n_train, n_eval = COUNTS[name]
    train, eval_ = real(name, "train"), real(name, "eval")
    assert (len(train), len(eval_)) == (n_train, n_eval)
    for ex in (*train, *eval_):
        assert len(ex.texts) == len(task.text_fields) and all(isinstance(t, str) and t for t in ex.texts)
        if task.kind == "classification":
            assert isinstance(ex.label, int) and 0 <= ex.label < task.num_labels
            assert ex.target is None and ex.refs == ()
        elif task.kind == "regression":
            assert isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0
        else:
            assert ex.label is None and ex.target is not None and ex.target == ex.refs[0]


@needs_data
def test_label_distributions() -> None:
    def dist(name: str, split: Split) -> dict[int | float | None, int]:
        return dict(Counter(ex.label for ex in real(name, split)))

    # counted independently with `cut -f<label column> <file> | sort | uniq -c`
    assert dist("sst2", "train") == {0: 29_780, 1: 37_569}
    assert dist("sst2", "eval") == {0: 428, 1: 444}
    assert dist("cola", "eval") == {0: 322, 1: 721}
    assert dist("mrpc", "eval") == {0: 129, 1: 279}
    assert dist("rte", "train") == {0: 1_249, 1: 1_241}  # entailment, not_entailment
    assert dist("rte", "eval") == {0: 146, 1: 131}
    assert dist("wnli", "eval") == {0: 40, 1: 31}
    assert dist("agnews", "train") == {0: 2_509, 1: 2_458, 2: 2_496, 3: 2_538}
    assert dist("agnews", "eval") == {0: 1_900, 1: 1_900, 2: 1_900, 3: 1_900}


@needs_data
def test_first_rows_and_stray_quotes() -> None:
    mrpc = real("mrpc", "train")[0]  # the header starts with a byte-order mark
    assert mrpc.label == 1 and mrpc.texts[0].startswith('Amrozi accused his brother , whom he called " the')
    assert mrpc.texts[1].startswith('Referring to him as only " the witness "')
    cola = real("cola", "train")[0]  # no header
    assert cola == Example(("Our friends won't buy this analysis, let alone the next one we propose.",), 1)
    stsb = real("stsb", "train")[:2]
    assert [ex.label for ex in stsb] == [5.0, 3.8]
    assert stsb[0].texts == ("A plane is taking off.", "An air plane is taking off.")
    assert real("rte", "train")[0].label == 1  # not_entailment
    assert real("agnews", "eval")[0].label == 2  # Business
    # QUOTE_NONE keeps quotes as characters: no row swallows its neighbours
    assert max(len(ex.texts[0]) for ex in real("sst2", "train")) < 300


@needs_data
def test_e2e_references_grouped_by_mr() -> None:
    train, eval_ = real("e2e", "train"), real("e2e", "eval")
    assert len({ex.texts for ex in train}) == 547
    assert all(ex.refs == (ex.target,) for ex in train)
    assert len({ex.texts for ex in eval_}) == 630  # one example per MR
    assert sum(len(ex.refs) for ex in eval_) == 4_693
    assert all(len(ex.refs) >= 1 and ex.target == ex.refs[0] for ex in eval_)
    first = eval_[0]
    assert first.texts == ("name[Blue Spice], eatType[coffee shop], area[city centre]",)
    assert first.refs[:2] == (
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    )


@needs_data
def test_gsm8k_answers_parse() -> None:
    train, test = real("gsm8k", "train"), real("gsm8k", "eval")
    assert reference_answer(train[0].target or "") == 72.0
    assert reference_answer(test[0].target or "") == 18.0
    answers = [reference_answer(ex.target or "") for ex in (*train, *test)]
    assert all(a == int(a) for a in answers)  # GSM8K's answers are whole numbers
    assert min(answers) < 0 and max(answers) > 1_000  # negatives and thousands separators parse
    refs = [ex.target or "" for ex in test]
    assert answer_accuracy(refs, refs) == 100.0
    # a model that outputs only "#### <answer>" with a wrong number scores 0
    wrong = [f"#### {a + 1}" for a in answers[-len(test) :]]
    assert compute("gsm8k", wrong, test) == {"answer_accuracy": 0.0}


@needs_data
def test_limit_and_seed() -> None:
    full = real("rte", "eval")
    assert load_split("rte", "eval", limit=5) == full[:5]
    assert load_split("rte", "eval", limit=10_000) == full
    assert load_split("rte", "eval", limit=0) == []
    a = load_split("rte", "eval", limit=20, seed=1)
    assert a == load_split("rte", "eval", limit=20, seed=1)  # deterministic
    assert a != full[:20] and a != load_split("rte", "eval", limit=20, seed=2)
    assert len(set(a)) == 20 and set(a) <= set(full)
    assert load_split("rte", "eval", limit=10, seed=1) == a[:10]  # nested subsets
    assert load_split("rte", "eval", seed=1) == full  # seed alone changes nothing
    assert TASKS["rte"].load("eval", limit=3) == full[:3]


# ----------------------------------------------------------------------------------------------------
# data_dir and errors for the built-in tasks (no real data needed)
# ----------------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_data_dir_argument_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = "index\tsentence1\tsentence2\tlabel\n"
    write(tmp_path / "glue/RTE/dev.tsv", header + '0\tA "b.\tC.\tnot_entailment\n')
    expected = [Example(('A "b.', "C."), 1)]
    assert load_split("rte", "eval", data_dir=tmp_path) == expected
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path))
    assert load_split("rte", "eval") == expected


def test_unknown_task_and_split() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'mnli'; known tasks: agnews, cola, e2e, gsm8k"):
        load_split("mnli", "train")
    with pytest.raises(ValueError, match=r"unknown split 'test'; use one of 'train', 'eval'"):
        load_split("rte", "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_split("rte", "eval", limit=-1)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_split("sst2", "train", data_dir=tmp_path)
    message = str(info.value)
    assert "task 'sst2' (train split) not found" in message
    assert str(tmp_path / "glue/SST-2/train.tsv") in message
    assert "../shared/datasets" in message and "DELTATUNE_DATA" in message


# ----------------------------------------------------------------------------------------------------
# users' own files
# ----------------------------------------------------------------------------------------------------


def test_load_csv_tsv_jsonl(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "a.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\n\n')
    assert load_file(csv_file, ["text"], "label", "classification", label_names=["neg", "pos"]) == [
        Example(("hello, world",), 1),
        Example(("two\nlines",), 0),
    ]
    tsv_file = write(tmp_path / "a.tsv", 's1\ts2\tscore\n"quoted\tx\t4.5\n')
    assert load_file(tsv_file, ["s1", "s2"], "score", "regression") == [Example(('"quoted', "x"), 4.5)]
    lines = '{"q": "1+1?", "a": "#### 2", "x": 0}\n\n{"q": "2+2?", "a": "#### 4"}'  # no final newline
    jsonl = write(tmp_path / "a.jsonl", lines)
    assert load_file(jsonl, ["q"], "a", "generation") == [
        Example(("1+1?",), None, "#### 2", ("#### 2",)),
        Example(("2+2?",), None, "#### 4", ("#### 4",)),
    ]
    ints = write(tmp_path / "i.jsonl", '{"t": "a", "y": 2}\n{"t": "b", "y": "0"}\n')
    assert [ex.label for ex in load_file(ints, ["t"], "y", "classification")] == [2, 0]
    headerless = write(tmp_path / "h.tsv", "x\t1\n")
    assert load_file(headerless, ["t"], "y", "classification", fieldnames=["t", "y"]) == [Example(("x",), 1)]


def test_group_refs(tmp_path: Path) -> None:
    f = write(tmp_path / "g.csv", "mr,ref\nA,a1\nB,b1\nA,a2\n")
    assert load_file(f, ["mr"], "ref", "generation", group_refs=True) == [
        Example(("A",), None, "a1", ("a1", "a2")),
        Example(("B",), None, "b1", ("b1",)),
    ]
    with pytest.raises(ValueError, match="group_refs only applies to generation"):
        load_file(f, ["mr"], "ref", "classification", group_refs=True)


def test_missing_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "m.tsv", "sentence\tlabel\nx\t1\n")
    with pytest.raises(ValueError) as info:
        load_file(f, ["sentence1", "sentence2"], "label", "classification")
    message = str(info.value)
    assert str(f) in message
    assert "missing column(s) 'sentence1', 'sentence2'; the file has: 'sentence', 'label'" in message
    j = write(tmp_path / "m.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    expected = r"m\.jsonl row 2: column 'answer' is missing"
    with pytest.raises(ValueError, match=expected):
        load_file(j, ["question"], "answer", "generation")


def test_empty_files(tmp_path: Path) -> None:
    for name, text in [("e.csv", ""), ("e.tsv", "text\tlabel\n"), ("e.jsonl", "\n\n")]:
        f = write(tmp_path / name, text)
        with pytest.raises(ValueError, match=rf"{re.escape(str(f))}: the file (is empty|has no examples)"):
            load_file(f, ["text"], "label", "classification")


def test_unparsable_labels(tmp_path: Path) -> None:
    f = write(tmp_path / "l.tsv", "text\tlabel\na\tpos\nb\tmaybe\n")
    with pytest.raises(ValueError) as info:
        load_file(f, ["text"], "label", "classification", label_names=["neg", "pos"])
    assert str(info.value) == (
        f"{f} row 2: cannot parse label 'maybe' in column 'label'; "
        "expected one of 'neg', 'pos' or an integer 0..1"
    )
    with pytest.raises(ValueError, match=r"row 1: cannot parse label '2'.*integer 0\.\.1"):
        r = write(tmp_path / "r.tsv", "text\tlabel\na\t2\n")
        load_file(r, ["text"], "label", "classification", label_names=["neg", "pos"])
    with pytest.raises(ValueError, match=r"row 1: cannot parse label '-1'.*non-negative integer"):
        load_file(write(tmp_path / "n.tsv", "text\tlabel\na\t-1\n"), ["text"], "label", "classification")
    expected = r"s\.csv row 2: cannot parse label 'high' in column 'score'; expected a number"
    with pytest.raises(ValueError, match=expected):
        load_file(write(tmp_path / "s.csv", "t,score\na,1.5\nb,high\n"), ["t"], "score", "regression")
    with pytest.raises(ValueError, match="expected a finite number"):
        load_file(write(tmp_path / "nan.csv", "t,score\na,nan\n"), ["t"], "score", "regression")
    with pytest.raises(ValueError, match=r"row 1: cannot parse label True"):
        load_file(write(tmp_path / "b.jsonl", '{"t": "a", "y": true}\n'), ["t"], "y", "classification")


def test_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data file not found: .*nope\.csv"):
        load_file(tmp_path / "nope.csv", ["t"], "y", "classification")
    known = r"\.jsonl, \.json, \.csv, \.tsv, \.parquet"
    with pytest.raises(ValueError, match=rf"unknown file format '\.txt'; use one of {known}"):
        load_file(write(tmp_path / "a.txt", "t\ty\n"), ["t"], "y", "classification")
    with pytest.raises(ValueError, match=r"w\.tsv line 3: expected 2 fields, found 3"):
        load_file(write(tmp_path / "w.tsv", "t\ty\na\t1\nb\t1\textra\n"), ["t"], "y", "classification")
    with pytest.raises(ValueError, match=r"j\.jsonl line 2: not valid JSON"):
        load_file(write(tmp_path / "j.jsonl", '{"t": "a", "y": 1}\n{"t": \n'), ["t"], "y", "classification")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        load_file(write(tmp_path / "k.jsonl", "[1, 2]\n"), ["t"], "y", "classification")
    with pytest.raises(ValueError, match=r"row 1: column 't' should be text, got 5"):
        load_file(write(tmp_path / "x.jsonl", '{"t": 5, "y": 1}\n'), ["t"], "y", "classification")
    with pytest.raises(ValueError, match="kind must be one of classification, regression, generation"):
        load_file(tmp_path / "x.jsonl", ["t"], "y", "ranking")  # type: ignore[arg-type]


def test_task_from_file(tmp_path: Path) -> None:
    rows = [("a", "spam"), ("b", "ham"), ("c", "spam")]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"t": t, "y": y}) + "\n" for t, y in rows))
    eval_ = write(tmp_path / "eval.jsonl", '{"t": "d", "y": "ham"}\n{"t": "e", "y": "spam"}\n')
    task = Task.from_file("spam", train, eval_, ["t"], "y", "classification")
    assert task.label_names == ("ham", "spam") and task.num_labels == 2  # sorted distinct values
    assert task.metrics == ("accuracy", "f1", "matthews") and task.main_metric == "accuracy"
    assert task.load("train") == [Example(("a",), 1), Example(("b",), 0), Example(("c",), 1)]
    examples = load_split(task, "eval", data_dir="/ignored")
    assert examples == [Example(("d",), 0), Example(("e",), 1)]
    assert compute(task, [0, 0], examples) == {"accuracy": 50.0, "f1": 0.0, "matthews": 0.0}

    ints = write(tmp_path / "ints.csv", "t,y\na,3\nb,0\n")
    assert Task.from_file("n", ints, ints, ["t"], "y", "classification").label_names == ("0", "1", "2", "3")
    assert Task.from_file("n", ints, ints, ["t"], "y", "classification").metrics == ("accuracy",)
    reg = Task.from_file("r", ints, ints, ["t"], "y", "regression")
    assert (reg.metrics, reg.num_labels, reg.load("eval")[0].label) == (("pearson", "spearman"), 1, 3.0)
    gen = Task.from_file("g", ints, ints, ["t"], "y", "generation", metrics=["rouge_l"], group_eval_refs=True)
    assert gen.main_metric == "rouge_l" and gen.num_labels == 0
    assert gen.load("eval")[0] == Example(("a",), None, "3", ("3",))


def test_task_validation() -> None:
    def loader(split: Split, data_dir: Path) -> list[Example]:
        return []

    base = dict(name="t", text_fields=("x",), label_field="y", loader=loader)
    with pytest.raises(ValueError, match=r"task 't': unknown metric\(s\) \['blue'\]; known: accuracy"):
        Task(kind="generation", label_names=(), metrics=("blue",), main_metric="blue", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="main_metric 'f1' is not in metrics"):
        Task(kind="classification", label_names=("a", "b"), metrics=("accuracy",), main_metric="f1", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs at least two label_names"):
        Task(kind="classification", label_names=("a",), metrics=("accuracy",), main_metric="accuracy", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_names only make sense for classification"):
        Task(kind="regression", label_names=("a", "b"), metrics=("pearson",), main_metric="pearson", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind must be one of"):
        Task(kind="ranking", label_names=(), metrics=("bleu",), main_metric="bleu", **base)  # type: ignore[arg-type]
