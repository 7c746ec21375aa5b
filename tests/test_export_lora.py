"""Every low-rank method exported as a plain LoRA (deltatune.formats.lora) loads in PEFT with our
outputs; what is not low-rank is refused, or exported as its best rank-R LoRA when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY
from deltatune.contract.fields import from_jsonable
from deltatune.contract.layer import as_layer
from deltatune.formats.lora import export_lora, lora_factors
from deltatune.runtime.deltas import Factors, compact, truncate
from deltatune.runtime.wrapper import attachment_of
from toy_models import TOYS

peft = pytest.importorskip("peft")

TOL = 1e-5
PLAIN_TOYS = [t for t in TOYS if t.name in ("mlp", "embedding", "conv1d", "transformer")]


def cases() -> list[tuple[str, type, dict[str, Any]]]:
    out = []
    for name, cls in sorted(REGISTRY.items()):
        if cls.model_level:
            continue
        out.append((name, cls, dict(cls.suite.example)))
        for label, spec in cls.suite.variants.items():
            if spec.get("calibration") or spec.get("quantized_base"):
                continue
            fields = {k: from_jsonable(v, k) for k, v in spec["fields"].items()}
            out.append((f"{name}[{label}]", cls, fields))
    return out


CASES = cases()


def adapted(cls: type, fields: dict[str, Any], toy: Any, seed: int = 0) -> nn.Module | None:
    """The toy with the method on every module it accepts (the head kept whole), its trainable
    tensors moved off their init; None if the method fits no module of the toy."""
    model = toy.build()
    method = cls(**fields)
    kinds = cls.layer_types
    paths = [
        p
        for p, m in model.named_modules()
        if p and p != toy.head and dt.targets.module_kind(m) in kinds and method.accepts(m)
    ]
    outer = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    if not outer:
        return None
    try:
        dt.inject(model, method, targets=outer, seed=seed, modules_to_save=[toy.head] if toy.head else [])
    except ValueError:
        return None
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def low_rank(model: nn.Module) -> bool:
    att = attachment_of(model)
    return all(as_layer(la).lora_form() is not None for la in att.adapter_layers("default").values())


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("label,cls,fields", CASES, ids=[c[0] for c in CASES])
def test_a_low_rank_adapter_exports_as_a_plain_lora_that_peft_runs(
    label: str, cls: type, fields: dict[str, Any], tmp_path: Path
) -> None:
    ran = 0
    for toy in PLAIN_TOYS:
        model = adapted(cls, fields, toy)
        if model is None:
            continue
        x = toy.inputs(torch.Generator().manual_seed(0))
        ours = outputs(model, x)
        folder = tmp_path / toy.name
        if not low_rank(model):
            with pytest.raises(ValueError, match="--to merged"):
                export_lora(model, folder)
            assert not folder.exists()  # nothing half-written
            continue
        report = export_lora(model, folder)
        assert report.max_error == 0.0
        loaded = peft.PeftModel.from_pretrained(toy.build(), folder).eval()
        theirs = outputs(loaded, x)
        assert (theirs - ours).abs().max() <= TOL * max(1.0, float(ours.abs().max())), (label, toy.name)
        ran += 1
    if ran == 0 and all(adapted(cls, fields, t) is None for t in PLAIN_TOYS):
        pytest.skip(f"{label} fits none of the plain toys")


def test_the_methods_that_are_not_low_rank_are_the_expected_ones() -> None:
    """A guard on the contract: a new low-rank method should give lora_form()."""
    not_low = set()
    for label, cls, fields in CASES:
        for toy in PLAIN_TOYS:
            model = adapted(cls, fields, toy)
            if model is not None:
                if not low_rank(model):
                    not_low.add(label.split("[")[0])
                break
    # (trainable tokens replace rows: the merged weight differs from the base in k rows, but the
    # layer gives no lora_form, and vLLM and llama.cpp load no embedding-row deltas)
    assert not_low == {"adapter", "amlora", "bitfit", "dora", "intrinsic", "partial", "trainable_tokens"}, (
        not_low
    )


def _stateful(name: str, **fields: Any) -> tuple[nn.Module, Any]:
    toy = TOYS[0]  # mlp
    model = adapted(REGISTRY[name], {**dict(REGISTRY[name].suite.example), **fields}, toy)
    assert model is not None
    return model, toy


def _peft_matches(model: nn.Module, toy: Any, folder: Path) -> dict[str, int]:
    x = toy.inputs(torch.Generator().manual_seed(0))
    ours = outputs(model, x)
    report = export_lora(model, folder)
    loaded = peft.PeftModel.from_pretrained(toy.build(), folder).eval()
    assert (outputs(loaded, x) - ours).abs().max() <= TOL
    return report.ranks


def test_relora_folds_delta_lora_snapshots_and_adalora_masks_export_exactly(tmp_path: Path) -> None:
    # ReLoRA after two restarts: the stacked folds are part of the LoRA (rank 3r).
    model, toy = _stateful("relora", rank=2)
    layers = attachment_of(model).adapter_layers("default")
    g = torch.Generator().manual_seed(1)
    for step in (10, 20):
        for layer in layers.values():
            layer.restart(step)
            with torch.no_grad():
                layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    assert set(_peft_matches(model, toy, tmp_path / "relora").values()) == {6}
    # Delta-LoRA once W moves: its factors hold 3r columns, of which 2r are independent.
    model, toy = _stateful("delta_lora", rank=2)
    for layer in attachment_of(model).adapter_layers("default").values():
        layer.take_snapshot()
        with torch.no_grad():
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    assert set(_peft_matches(model, toy, tmp_path / "delta").values()) == {4}
    # AdaLoRA with pruned triplets: the exported rank is the kept count, per module.
    model, toy = _stateful("adalora")
    layers = attachment_of(model).adapter_layers("default")
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.rank_mask[:2] = False
        first.lora_E[:2] = 0.0
    ranks = _peft_matches(model, toy, tmp_path / "adalora")
    assert ranks[next(iter(layers))] == first.rank - 2
    saved = json.loads((tmp_path / "adalora" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] or len(set(ranks.values())) == 1


def test_an_olora_sequence_exports_as_the_sum_of_its_tasks(tmp_path: Path) -> None:
    toy = TOYS[0]
    model = toy.build()
    g = torch.Generator().manual_seed(5)

    def train_a_little() -> None:
        with torch.no_grad():
            for p in dt.trainable_parameters(model):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    dt.continual.start(model, dt.OLoRA(rank=2), "first", targets=["fc1", "fc2"])
    train_a_little()
    dt.continual.add_task(model, "second")
    train_a_little()
    model.eval()
    assert set(_peft_matches(model, toy, tmp_path / "olora").values()) == {4}


def test_pissa_exports_its_difference_from_the_original_weight(tmp_path: Path) -> None:
    model, toy = _stateful("lora", rank=2, init=dt.PiSSA())
    ranks = _peft_matches(model, toy, tmp_path / "pissa")
    assert set(ranks.values()) == {4}  # [B | -B0] [A ; A0]


def test_a_dense_update_is_refused_or_truncated_with_its_error(tmp_path: Path) -> None:
    model, toy = _stateful("dora", rank=2)
    with pytest.raises(ValueError, match="not a low-rank update.*--to merged.*--approximate-rank"):
        export_lora(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # At full rank the truncation is exact; below it the error is reported, and PEFT runs the
    # truncated LoRA (= the merged weight's best rank-R approximation) exactly.
    x = toy.inputs(torch.Generator().manual_seed(0))
    exact = export_lora(model, tmp_path / "full", approximate_rank=64)
    assert exact.max_error < 1e-6
    loaded = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "full").eval()
    assert (outputs(loaded, x) - outputs(model, x)).abs().max() <= 1e-4
    rough = export_lora(model, tmp_path / "rank1", approximate_rank=1)
    assert set(rough.ranks.values()) == {1} and 0 < rough.max_error < 1
    _, factors, errors = lora_factors(model, approximate_rank=1)
    assert errors == rough.errors and all(f.rank == 1 for f in factors.values())


def test_compact_keeps_a_full_rank_lora_bit_for_bit_and_drops_what_repeats() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 10, generator=g), torch.randn(8, 3, generator=g)
    f = Factors(A, B, 0.5, "linear")
    assert compact(f) is f
    doubled = Factors(torch.cat([A, A]), torch.cat([B, 2 * B], dim=1), 0.5, "linear")
    small = compact(doubled)
    assert small.rank == 3
    assert torch.allclose(small.product(), 3 * f.product(), atol=1e-5)
    t, error = truncate(f.product().float(), 3, "linear")
    assert error < 1e-6 and torch.allclose(t.product(), f.product(), atol=1e-5)


def test_a_qpissa_adapter_is_refused_and_a_qlora_one_exports(tmp_path: Path) -> None:
    """QPiSSA's factors are relative to the quantised residual, which no LoRA on the original weight
    reproduces; a QLoRA adapter is an ordinary LoRA of its (4-bit) base."""
    from deltatune.runtime.quant import quantize

    torch.manual_seed(0)
    qpissa = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    dt.inject(qpissa, dt.LoRA(rank=4, init=dt.PiSSA()), targets=["0"])
    quantize(qpissa, ["0"], iterations=2)
    with pytest.raises(ValueError, match="QPiSSA residual.*merged"):
        export_lora(qpissa, tmp_path / "qpissa")
    qlora = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    dt.inject(qlora, dt.LoRA(rank=4), targets=["0"])
    quantize(qlora, ["0"])
    assert export_lora(qlora, tmp_path / "qlora").ranks == {"0": 4}


def test_targets_that_are_suffixes_of_other_modules_are_written_as_one_expression(tmp_path: Path) -> None:
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(8, 8)
            self.block = nn.Sequential()
            self.block.add_module("fc1", nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.fc1(x))

    model = Nested()
    dt.inject(model, dt.LoRA(rank=2), targets=dt.Target(pattern="fc1"))  # the root's fc1 only
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.3)
    x = torch.randn(3, 8)
    export_lora(model, tmp_path / "nested")
    saved = json.loads((tmp_path / "nested" / "adapter_config.json").read_text())
    assert saved["target_modules"] == "^(?:fc1)$"  # a list entry "fc1" would also take block.fc1
    loaded = peft.PeftModel.from_pretrained(Nested(), tmp_path / "nested").eval()
    assert not any("block.fc1.lora_A" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
