"""A catalogue of bad inputs across the API, the CLI and the loaders (issue 13).

Each case asserts the exception type and that the message names what is wrong (the field, module,
tensor or file) and what was expected instead. Then property-based tests (hypothesis) over method
configurations and layer shapes for the inject / merge / unload / save / load invariants.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import deltatune as dt
from deltatune.cli.main import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Net(nn.Module):
    """Two linear layers and an embedding: enough for every check here."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def lora_model() -> Net:
    net = Net()
    dt.inject(net, dt.LoRA(rank=2), targets=["fc1", "fc2"])
    return net


# -- method configurations (API) -------------------------------------------------------------------

CONFIGS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    ("lora-rank-0", lambda: dt.LoRA(rank=0), ValueError, ["rank", ">= 1"]),
    ("lora-rank-float", lambda: dt.LoRA(rank=1.5), ValueError, ["rank", "int"]),
    ("lora-rank-str", lambda: dt.LoRA(rank="8"), ValueError, ["rank", "int"]),
    ("lora-alpha-0", lambda: dt.LoRA(alpha=0.0), ValueError, ["alpha", "> 0"]),
    ("lora-alpha-negative", lambda: dt.LoRA(alpha=-1.0), ValueError, ["alpha", "> 0"]),
    ("lora-dropout-1", lambda: dt.LoRA(dropout=1.0), ValueError, ["dropout", "[0, 1)"]),
    ("lora-dropout-negative", lambda: dt.LoRA(dropout=-0.1), ValueError, ["dropout", "[0, 1)"]),
    ("lora-save-mode", lambda: dt.LoRA(save_mode="x"), ValueError, ["save_mode", "'lora'"]),
    ("lora-rank-stabilized-str", lambda: dt.LoRA(rank_stabilized="yes"), ValueError, ["rank_stabilized"]),
    ("lora-init-str", lambda: dt.LoRA(init="pissa"), ValueError, ["init"]),
    ("lora-unknown-field", lambda: dt.LoRA(ranks=8), TypeError, ["ranks"]),
    ("vblora-num-vectors-1", lambda: dt.VBLoRA(num_vectors=1), ValueError, ["num_vectors", ">= 2"]),
    ("vblora-topk-0", lambda: dt.VBLoRA(topk=0), ValueError, ["topk", ">= 1"]),
    ("vblora-logits-std-0", lambda: dt.VBLoRA(logits_std=0.0), ValueError, ["logits_std", "> 0"]),
    ("vblora-save-mode", lambda: dt.VBLoRA(save_mode="all"), ValueError, ["save_mode", "'topk'"]),
    (
        "vblora-weight-dtype",
        lambda: dt.VBLoRA(weight_dtype="bfloat16"),
        ValueError,
        ["weight_dtype", "float16"],
    ),
    ("adapter-nonlinearity", lambda: dt.Adapter(nonlinearity="tanhh"), ValueError, ["nonlinearity", "relu"]),
    ("bitfit-subset", lambda: dt.BitFit(subset="some"), ValueError, ["subset", "'all'"]),
    ("prompt-tokens-0", lambda: dt.PromptTuning(num_virtual_tokens=0), ValueError, ["num_virtual_tokens"]),
    ("prefix-tokens-0", lambda: dt.PrefixTuning(num_virtual_tokens=0), ValueError, ["num_virtual_tokens"]),
    ("ptuning-encoder", lambda: dt.PTuning(encoder="gru"), ValueError, ["encoder", "lstm"]),
    ("intrinsic-d-0", lambda: dt.IntrinsicDimension(d=0), ValueError, ["d", ">= 1"]),
    ("partial-blocks-0", lambda: dt.Partial(blocks=0), ValueError, ["blocks"]),
]


@pytest.mark.parametrize(("make", "exc", "words"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_bad_method_config(make: Callable[[], Any], exc: type[Exception], words: list[str]) -> None:
    _raises(make, exc, words)


# -- verbs (API) -------------------------------------------------------------------------------------


def _inject(method: Any, targets: Any) -> Callable[[], Any]:
    return lambda: dt.inject(Net(), method, targets=targets)


def _twice() -> None:
    net = lora_model()
    dt.inject(net, dt.LoRA(rank=2), targets=["fc1"])


VERBS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    ("inject-class", _inject(dt.LoRA, ["fc1"]), ValueError, ["class LoRA", "LoRA()"]),
    ("inject-string-method", _inject("lora", ["fc1"]), ValueError, ["registered", "lora"]),
    ("targets-int", _inject(dt.LoRA(), 42), ValueError, ["42", "targets may be", "re.compile"]),
    ("targets-float-in-list", _inject(dt.LoRA(), ["fc1", 3.5]), ValueError, ["3.5", "targets may be"]),
    ("targets-empty", _inject(dt.LoRA(), []), ValueError, ["targets", "at least one"]),
    ("targets-no-match", _inject(dt.LoRA(), ["fc3"]), ValueError, ["'fc3'", "matched no module", "fc1"]),
    ("targets-regex-as-str", _inject(dt.LoRA(), r"fc\d"), ValueError, ["matched no module", "re.compile"]),
    ("targets-compiled-no-match", _inject(dt.LoRA(), re.compile("q.*")), ValueError, ["re.compile('q.*')"]),
    ("inject-twice", _twice, ValueError, ["default", "already"]),
    (
        "vblora-length-not-dividing",
        _inject(dt.VBLoRA(rank=2, num_vectors=4, vector_length=5), ["fc1"]),
        ValueError,
        ["vector_length", "fc1"],
    ),
    ("set-active-missing", lambda: dt.set_active(lora_model(), "nope"), ValueError, ["'nope'", "default"]),
    ("delete-missing", lambda: dt.delete_adapter(lora_model(), "nope"), ValueError, ["'nope'", "default"]),
    ("merge-no-adapters", lambda: dt.merge(Net()), ValueError, ["Net has no deltatune adapters", "inject"]),
    ("unload-no-adapters", lambda: dt.unload(Net()), ValueError, ["Net has no deltatune adapters", "inject"]),
    (
        "save-no-adapters",
        lambda: dt.save(Net(), "/tmp/never-written"),
        ValueError,
        ["Net has no deltatune adapters", "inject"],
    ),
    (
        "attachment-of-bare",
        lambda: dt.attachment_of(Net()),
        ValueError,
        ["Net has no deltatune adapters", "inject"],
    ),
]


@pytest.mark.parametrize(("call", "exc", "words"), [c[1:] for c in VERBS], ids=[c[0] for c in VERBS])
def test_bad_verb_call(call: Callable[[], Any], exc: type[Exception], words: list[str]) -> None:
    _raises(call, exc, words)


# -- deltatune's loader ------------------------------------------------------------------------------


def _saved(tmp: Path) -> Path:
    return dt.save(lora_model(), tmp / "adapter")


def _edit_config(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = _saved(tmp)
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return folder

    return make


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = _saved(tmp)
        path = folder / "adapter.safetensors"
        tensors = dict(dt.formats.io.read_tensors(path))
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return folder

    return make


def _write(name: str, text: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = _saved(tmp)
        (folder / name).write_text(text)
        return folder

    return make


def _missing(tmp: Path) -> Path:
    return tmp / "adaptr"  # a typo: no such folder


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


LOADS: list[tuple[str, Callable[[Path], Path], type[Exception], list[str]]] = [
    ("missing-folder", _missing, ValueError, ["adaptr", "does not exist"]),
    ("empty-folder", _empty, ValueError, ["empty", "no adapter_config.json"]),
    ("config-not-json", _write("adapter_config.json", "{oops"), ValueError, ["adapter_config.json", "JSON"]),
    (
        "config-json-list",
        _write("adapter_config.json", "[1, 2]"),
        ValueError,
        ["adapter_config.json", "object"],
    ),
    (
        "peft-folder",
        _write("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8})),
        ValueError,
        ["PEFT adapter", "import_peft"],
    ),
    (
        "format-version-missing",
        _edit_config(lambda c: c.pop("format_version")),
        ValueError,
        ["format_version", "integer"],
    ),
    (
        "format-version-newer",
        _edit_config(lambda c: c.update(format_version=999)),
        ValueError,
        ["999"],
    ),
    (
        "method-unknown",
        _edit_config(lambda c: c.update(method="no_such_method")),
        ValueError,
        ["no_such_method", "lora"],
    ),
    (
        "config-field-bad",
        _edit_config(lambda c: c["config"].update(rank=0)),
        ValueError,
        ["rank", ">= 1"],
    ),
    (
        "config-field-unknown",
        _edit_config(lambda c: c["config"].update(ranks=3)),
        ValueError,
        ["ranks"],
    ),
    (
        "target-not-in-model",
        _edit_config(lambda c: c.update(targets=["fc1", "fc9"])),
        ValueError,
        ["fc9"],
    ),
    ("tensor-missing", _edit_tensors(lambda t: t.pop("fc2.lora_B")), ValueError, ["fc2.lora_B"]),
    (
        "tensor-extra",
        _edit_tensors(lambda t: t.update({"fc2.lora_C": torch.zeros(2)})),
        ValueError,
        ["fc2.lora_C"],
    ),
    (
        "tensor-shape",
        _edit_tensors(lambda t: t.update({"fc1.lora_A": torch.zeros(3, 8)})),
        ValueError,
        ["fc1.lora_A"],
    ),
    (
        "weights-corrupt",
        _write("adapter.safetensors", "not a safetensors file"),
        ValueError,
        ["adapter.safetensors"],
    ),
]


@pytest.mark.parametrize(("make", "exc", "words"), [c[1:] for c in LOADS], ids=[c[0] for c in LOADS])
def test_bad_adapter_folder(
    make: Callable[[Path], Path], exc: type[Exception], words: list[str], tmp_path: Path
) -> None:
    folder = make(tmp_path)
    _raises(lambda: dt.load(Net(), folder), exc, words)


# -- PEFT's loader (import_peft) ---------------------------------------------------------------------

PREFIX = "base_model.model."


def _peft_lora(**config: Any) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["fc1"],
        **config,
    }


def _peft_folder(
    config: dict[str, Any] | str | None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = tmp / "peft"
        folder.mkdir()
        if config is not None:
            text = config if isinstance(config, str) else json.dumps(config)
            (folder / "adapter_config.json").write_text(text)
        lora = {
            f"{PREFIX}fc1.lora_A.weight": torch.randn(2, 8),
            f"{PREFIX}fc1.lora_B.weight": torch.randn(16, 2),
        }
        save_file(lora if tensors is None else tensors, str(folder / "adapter_model.safetensors"))
        return folder

    return make


def _deltatune_folder(tmp: Path) -> Path:
    return _saved(tmp)


def _no_weights(tmp: Path) -> Path:
    folder = _peft_folder(_peft_lora())(tmp)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    return folder


VBLORA = {
    "peft_type": "VBLORA",
    "r": 2,
    "vector_length": 4,
    "topk": 2,
    "target_modules": ["fc1"],
}
VB_TENSORS = {
    "base_model.vblora_vector_bank": torch.randn(6, 4),
    f"{PREFIX}fc1.vblora_logits_A": torch.randn(2, 2, 6),
    f"{PREFIX}fc1.vblora_logits_B": torch.randn(16, 2, 6),
}
SEQ_CLS_TENSORS = {
    f"{PREFIX}fc1.lora_A.weight": torch.randn(2, 8),
    f"{PREFIX}fc1.lora_B.weight": torch.randn(16, 2),
    f"{PREFIX}classifier.weight": torch.randn(2, 8),
    f"{PREFIX}classifier.bias": torch.randn(2),
}

IMPORTS: list[tuple[str, Callable[[Path], Path], type[Exception], list[str]]] = [
    ("missing-folder", _missing, ValueError, ["adaptr", "does not exist"]),
    ("no-config", _peft_folder(None), ValueError, ["peft", "no adapter_config.json"]),
    ("config-not-json", _peft_folder("{'r': 8}"), ValueError, ["adapter_config.json", "not valid JSON"]),
    ("config-json-list", _peft_folder("[]"), ValueError, ["adapter_config.json", "list", "JSON object"]),
    ("r-eight", _peft_folder(_peft_lora(r="eight")), ValueError, ["adapter_config.json", "'r'", "integer"]),
    ("r-bool", _peft_folder(_peft_lora(r=True)), ValueError, ["'r'", "integer"]),
    ("alpha-str", _peft_folder(_peft_lora(lora_alpha="x")), ValueError, ["'lora_alpha'", "number"]),
    ("dropout-list", _peft_folder(_peft_lora(lora_dropout=[0.1])), ValueError, ["'lora_dropout'", "number"]),
    ("vblora-no-num-vectors", _peft_folder(VBLORA, VB_TENSORS), ValueError, ["'num_vectors'", "missing"]),
    (
        "vblora-bias",
        _peft_folder({**VBLORA, "num_vectors": 6, "bias": "all"}, VB_TENSORS),
        ValueError,
        ["bias='all'", "'none'"],
    ),
    ("deltatune-folder", _deltatune_folder, ValueError, ["deltatune adapter", "deltatune.load"]),
    ("peft-type-ia3", _peft_folder(_peft_lora(peft_type="IA3")), ValueError, ["'IA3'", "LORA"]),
    ("no-peft-type", _peft_folder({"r": 2}), ValueError, ["peft_type None", "LORA"]),
    (
        "unknown-field",
        _peft_folder(_peft_lora(lora_fancy=1)),
        ValueError,
        ["lora_fancy", "newer PEFT", "unknown_fields='ignore'"],
    ),
    (
        "pissa-unconverted",
        _peft_folder(_peft_lora(init_lora_weights="pissa")),
        ValueError,
        ["init_lora_weights='pissa'", "residual", "path_initial_model_for_weight_conversion"],
    ),
    (
        "pissa-niter",
        _peft_folder(_peft_lora(init_lora_weights="pissa_niter_4")),
        ValueError,
        ["pissa_niter_4"],
    ),
    ("olora", _peft_folder(_peft_lora(init_lora_weights="olora")), ValueError, ["init_lora_weights='olora'"]),
    ("corda", _peft_folder(_peft_lora(init_lora_weights="corda")), ValueError, ["init_lora_weights='corda'"]),
    ("loftq", _peft_folder(_peft_lora(init_lora_weights="loftq")), ValueError, ["init_lora_weights='loftq'"]),
    (
        "layer-replication",
        _peft_folder(_peft_lora(layer_replication=[[0, 1], [0, 1]])),
        ValueError,
        ["layer_replication", "null"],
    ),
    ("use-dora", _peft_folder(_peft_lora(use_dora=True)), ValueError, ["use_dora=True", "magnitude"]),
    ("bias-all", _peft_folder(_peft_lora(bias="all")), ValueError, ["bias='all'", "'none'"]),
    ("lora-bias", _peft_folder(_peft_lora(lora_bias=True)), ValueError, ["lora_bias=True"]),
    (
        "aLoRA",
        _peft_folder(_peft_lora(alora_invocation_tokens=[1, 2])),
        ValueError,
        ["alora_invocation_tokens"],
    ),
    (
        "trainable-tokens",
        _peft_folder(_peft_lora(trainable_token_indices=[1])),
        ValueError,
        ["trainable_token"],
    ),
    ("no-safetensors", _no_weights, ValueError, ["adapter_model.safetensors", "only safetensors"]),
    (
        "seq-cls-on-bare-encoder",
        _peft_folder(
            _peft_lora(task_type="SEQ_CLS", modules_to_save=["classifier", "score"]), SEQ_CLS_TENSORS
        ),
        ValueError,
        ["classifier.bias", "modules_to_save 'classifier'", "AutoModelForSequenceClassification"],
    ),
    (
        "module-not-in-model",
        _peft_folder(
            _peft_lora(),
            {
                f"{PREFIX}fc7.lora_A.weight": torch.randn(2, 8),
                f"{PREFIX}fc7.lora_B.weight": torch.randn(16, 2),
            },
        ),
        ValueError,
        ["fc7", "another model"],
    ),
    (
        "tensor-stranger",
        _peft_folder(_peft_lora(), {f"{PREFIX}fc1.weight": torch.randn(16, 8)}),
        ValueError,
        ["fc1.weight", "modules_to_save"],
    ),
]


@pytest.mark.parametrize(("make", "exc", "words"), [c[1:] for c in IMPORTS], ids=[c[0] for c in IMPORTS])
def test_bad_peft_folder(
    make: Callable[[Path], Path], exc: type[Exception], words: list[str], tmp_path: Path
) -> None:
    folder = make(tmp_path)
    net = Net()
    _raises(lambda: dt.import_peft(net, folder), exc, words)
    assert not dt.has_adapters(net)


def test_unknown_fields_can_be_ignored_on_purpose(tmp_path: Path) -> None:
    folder = _peft_folder(_peft_lora(lora_fancy=1))(tmp_path)
    att = dt.import_peft(Net(), folder, unknown_fields="ignore")
    assert list(att.info("default").targets) == ["fc1"]
    _raises(lambda: dt.import_peft(Net(), folder, unknown_fields="skip"), ValueError, ["'skip'", "'ignore'"])  # type: ignore[arg-type]


# -- the CLI -------------------------------------------------------------------------------------------


def _bare_saved(tmp: Path) -> Path:
    folder = dt.save(lora_model(), tmp / "adapter")  # a plain nn.Module: no base model recorded
    return folder


CLI: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    ("eval-typo", lambda t: ["eval", str(t / "adaptr")], ["adaptr", "does not exist"]),
    (
        "merge-typo",
        lambda t: ["merge", str(t / "adaptr"), "--out", str(t / "m")],
        ["adaptr", "does not exist"],
    ),
    ("info-typo", lambda t: ["info", str(t / "adaptr")], ["adaptr", "does not exist"]),
    ("eval-no-model", lambda t: ["eval", str(_bare_saved(t))], ["--model", "records none"]),
    ("info-empty", lambda t: ["info", str(_empty(t))], ["empty", "no adapter_config.json"]),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_bad_cli_call(
    argv: Callable[[Path], list[str]], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv(tmp_path)) != 0
    err = capsys.readouterr().err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def _raises(call: Callable[[], Any], exc: type[Exception], words: list[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_the_catalogue_has_at_least_60_bad_inputs() -> None:
    assert len(CONFIGS) + len(VERBS) + len(LOADS) + len(IMPORTS) + 1 + len(CLI) >= 60


# -- property-based: inject / merge / unload / save / load -----------------------------------------


@st.composite
def lora_setups(draw: st.DrawFn) -> tuple[dt.LoRA, int, int, bool]:
    rank = draw(st.integers(1, 6))
    method = dt.LoRA(
        rank=rank,
        alpha=draw(st.floats(0.5, 32.0, allow_nan=False, allow_infinity=False)),
        rank_stabilized=draw(st.booleans()),
    )
    return method, draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.booleans())


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _linear_model(n_in: int, n_out: int, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, n_out, bias=bias), nn.Tanh(), nn.Linear(n_out, n_in, bias=bias))


@settings(max_examples=25, deadline=None)
@given(setup=lora_setups(), seed=st.integers(0, 2**16))
def test_lora_inject_merge_unload_invariants(setup: tuple[dt.LoRA, int, int, bool], seed: int) -> None:
    method, n_in, n_out, bias = setup
    model = _linear_model(n_in, n_out, bias)
    base = copy.deepcopy(model)
    x = torch.randn(3, n_in, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = base(x)
    dt.inject(model, method, targets=["0", "2"])
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)  # identity at init
    _randomise(model, seed)
    with torch.no_grad():
        adapted = model(x)
    merged = dt.merge(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted, atol=1e-4, rtol=1e-4)
    dt.unload(model)
    assert not dt.has_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@st.composite
def method_setups(draw: st.DrawFn) -> tuple[Any, int]:
    width = draw(st.sampled_from([4, 8, 12, 16]))
    kind = draw(st.sampled_from(["lora", "vblora", "adapter", "bitfit"]))
    if kind == "lora":
        return dt.LoRA(rank=draw(st.integers(1, 4)), alpha=draw(st.floats(1.0, 16.0))), width
    if kind == "vblora":
        length = draw(st.sampled_from([d for d in (1, 2, 4) if width % d == 0]))
        h = draw(st.integers(2, 8))
        method = dt.VBLoRA(
            rank=draw(st.integers(1, 3)),
            num_vectors=h,
            vector_length=length,
            topk=draw(st.integers(1, h)),
            save_mode=draw(st.sampled_from(["topk", "logits"])),
        )
        return method, width
    if kind == "adapter":
        return dt.Adapter(bottleneck=draw(st.integers(1, 4))), width
    return dt.BitFit(), width


@settings(max_examples=25, deadline=None)
@given(setup=method_setups(), seed=st.integers(0, 2**16))
def test_save_load_round_trip_is_exact(setup: tuple[Any, int], seed: int, tmp_path_factory: Any) -> None:
    method, width = setup
    model = _linear_model(width, width, True)
    dt.inject(model, method, targets=["0", "2"])
    _randomise(model, seed)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x)
    folder = dt.save(model, tmp_path_factory.mktemp("rt") / "adapter")
    fresh = _linear_model(width, width, True)
    dt.load(fresh, folder)
    with torch.no_grad():
        got = fresh(x)
    assert torch.allclose(got, expected, atol=1e-6), (method, float((got - expected).abs().max()))
    assert all(math.isfinite(v) for v in got.flatten().tolist())
