"""Adapter arithmetic (deltatune.arithmetic): every combination type equals the dense computation on
each method's exact update, for every low-rank method and DoRA; PEFT's add_weighted_adapter agrees
where it is right and is shown wrong where it is (rsLoRA)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from torch import nn

import deltatune as dt
from deltatune.arithmetic import HOW
from deltatune.contract import REGISTRY
from deltatune.runtime.deltas import Factors, module_updates
from deltatune.runtime.wrapper import attachment_of

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

TARGETS = ["fc1", "fc2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


X = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


def two_adapters(method: Any, other: Any = None) -> nn.Module:
    model = Net()
    for i, (name, m) in enumerate((("a", method), ("b", other or method))):
        dt.inject(model, m, targets=TARGETS, name=name, seed=i + 1, activate=False)
    g = torch.Generator().manual_seed(2)
    att = attachment_of(model)
    with torch.no_grad():
        for name in ("a", "b"):
            shared = att.shared(name)
            modules = [*att.adapter_layers(name).values(), *([shared] if shared is not None else [])]
            for p in {id(p): p for m in modules for p in m.parameters()}.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    for name in ("a", "b"):  # (a vacuous test would compare zeros)
        assert all(float(u.norm()) > 1e-3 for u in dense_updates(model, name).values()), name
    return model.eval()


def dense_updates(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Each module's exact weight change, from the merged weight (independent of lora_form)."""
    att = attachment_of(model)
    out = {}
    for path in TARGETS:
        base = att.wrappers[path].base
        probe = copy.deepcopy(model)
        dt.set_active(probe, name)
        merged = dt.merge(probe)
        out[path] = merged.get_submodule(path).weight.detach().double() - base.weight.detach().double()
    return out


def truth(how: str, parts: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """PEFT's merge_utils on the dense updates (for DARE: density 1, its random drop off)."""
    w = torch.tensor(weights, dtype=torch.float64)
    if how in ("cat", "linear", "svd"):
        return merge_utils.task_arithmetic(parts, w)
    if how == "ties":
        return merge_utils.ties(parts, w, density, "total")
    if how == "magnitude_prune":
        return merge_utils.magnitude_prune(parts, w, density)
    if how == "dare_linear":
        return merge_utils.dare_linear(parts, w, density)
    return merge_utils.dare_ties(parts, w, density, "total")


LOW_RANK = sorted(
    n
    for n, cls in REGISTRY.items()
    if cls.__module__.startswith("deltatune.methods.lowrank") and not cls.model_level
)
METHODS = [n for n in LOW_RANK if n not in ("amlora",)]  # (AM-LoRA: an input-dependent mixture)


def example(name: str) -> Any:
    return REGISTRY[name](**dict(REGISTRY[name].suite.example))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", HOW)
def test_every_combination_equals_the_dense_truth(method: str, how: str) -> None:
    model = two_adapters(example(method))
    weights = {"a": 0.7, "b": -0.4}
    density = 1.0 if how.startswith("dare") else 0.5  # (DARE's drops: test_dare_...)
    extra: dict[str, Any] = (
        {"density": density} if how in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
    )
    dt.combine(model, weights, "c", how=how, rank="full", **extra)
    got = dense_updates(model, "c")
    a, b = dense_updates(model, "a"), dense_updates(model, "b")
    for path in TARGETS:
        want = truth(how, [a[path], b[path]], list(weights.values()), density)
        assert torch.allclose(got[path], want, atol=1e-5), (method, how, path)


def test_mixed_methods_and_ranks_combine_exactly() -> None:
    model = two_adapters(dt.LoRA(rank=2, rank_stabilized=True, alpha=4.0), dt.VeRA(rank=6))
    dt.combine(model, {"a": 1.0, "b": 1.0}, "c")
    dt.set_active(model, ["a", "b"])
    both = model(X)
    dt.set_active(model, "c")
    assert torch.allclose(model(X), both, atol=1e-5)
    assert attachment_of(model).info("c").method.rank == 2 + 6


def test_dora_combines_as_its_own_update() -> None:
    model = two_adapters(dt.DoRA(rank=2))
    dt.combine(model, {"a": 1.0, "b": 1.0}, "c")  # dense parts: stored at full rank, exact
    a, b, c = dense_updates(model, "a"), dense_updates(model, "b"), dense_updates(model, "c")
    for path in TARGETS:
        assert torch.allclose(c[path], a[path] + b[path], atol=1e-5)


def test_subtracting_an_adapter_gives_the_base_outputs_exactly(tmp_path: Any) -> None:
    model = Net()
    base = model(X)
    dt.inject(model, dt.LoRA(rank=3), targets=TARGETS, name="a")
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.5)
    dt.save(model, tmp_path / "a")
    dt.load(model, tmp_path / "a", name="again", activate=False)
    dt.combine(model, {"a": 1.0, "again": -1.0}, "none", how="linear")
    dt.set_active(model, "none")
    assert torch.equal(model(X), base)


def test_dare_drops_entries_with_the_seed_and_rescales_the_rest() -> None:
    model = two_adapters(dt.LoRA(rank=4))
    dt.combine(model, {"a": 1.0}, "d1", how="dare_linear", density=0.5, rank="full", seed=3)
    dt.combine(model, {"a": 1.0}, "d2", how="dare_linear", density=0.5, rank="full", seed=3)
    dt.combine(model, {"a": 1.0}, "d3", how="dare_linear", density=0.5, rank="full", seed=4)
    a, d1, d2, d3 = (dense_updates(model, n) for n in ("a", "d1", "d2", "d3"))
    kept = [((d1[p] - 2 * a[p]).abs() < 1e-5) & (d1[p].abs() > 1e-9) for p in TARGETS]
    dropped = [d1[p].abs() < 1e-5 for p in TARGETS]
    for k, d in zip(kept, dropped, strict=True):
        assert bool((k | d).all())  # each entry is dropped or doubled
    share = sum(int(k.sum()) for k in kept) / sum(k.numel() for k in kept)
    assert 0.35 < share < 0.65
    assert all(torch.allclose(d1[p], d2[p]) for p in TARGETS)  # the same seed, the same drops
    assert not all(torch.allclose(d1[p], d3[p]) for p in TARGETS)


def test_svd_keeps_the_rank_or_the_energy_asked() -> None:
    model = two_adapters(dt.LoRA(rank=3))
    dt.combine(model, {"a": 1.0, "b": 1.0}, "r2", how="svd", rank=2)
    assert {la.lora_A.shape[0] for la in attachment_of(model).layers("r2").values()} == {2}
    dt.combine(model, {"a": 1.0, "b": 1.0}, "all", how="svd", energy=1.0)
    exact = dense_updates(model, "all")
    a, b = dense_updates(model, "a"), dense_updates(model, "b")
    assert all(torch.allclose(exact[p], a[p] + b[p], atol=1e-5) for p in TARGETS)


PEFT_NAMES = {"a": "task_one", "b": "task_two"}


def peft_pair(rslora: bool, folder: Path) -> tuple[Any, nn.Module]:
    """The same two LoRAs in PEFT and in deltatune (PEFT's tensors imported)."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora
    )
    torch.manual_seed(5)
    # PEFT's own names are longer than ours: peft 0.18 saves every tensor whose key merely contains
    # the adapter's name, and "a" is in "base_model", so its file for "a" also held b's tensors
    theirs = peft.get_peft_model(Net(), config, adapter_name=PEFT_NAMES["a"])
    theirs.add_adapter(PEFT_NAMES["b"], config)
    theirs.eval()
    ours = Net()
    for name, peft_name in PEFT_NAMES.items():
        theirs.save_pretrained(folder / name, selected_adapters=[peft_name])
        # (PEFT saves a named adapter in a subfolder)
        dt.import_peft(ours, folder / name / peft_name, name=name)
    return theirs, ours.eval()


@pytest.mark.parametrize(
    "how,peft_how,kwargs",
    [
        ("cat", "cat", {}),
        ("svd", "svd", {"rank": 4}),
        ("ties", "ties_svd", {"rank": 4, "density": 0.5}),
        ("magnitude_prune", "magnitude_prune_svd", {"rank": 4, "density": 0.5}),
    ],
)
def test_peft_agrees_where_it_is_right(
    how: str, peft_how: str, kwargs: dict[str, Any], tmp_path: Path
) -> None:
    if peft_how != "cat" and Version(peft.__version__) < Version("0.21"):
        # their _svd_generalized_task_arithmetic_weighted_adapter multiplied each weight by the
        # adapter's scaling and then summed get_delta_weight, which scales again (0.21 dropped one)
        pytest.skip(f"peft {peft.__version__}'s svd combinations apply the LoRA scaling twice")
    theirs, ours = peft_pair(rslora=False, folder=tmp_path)
    weights = [0.6, 0.8]
    extra = {"svd_rank": kwargs["rank"]} if "rank" in kwargs else {}
    if "density" in kwargs:
        extra["density"] = kwargs["density"]
    theirs.add_weighted_adapter(list(PEFT_NAMES.values()), weights, "c", combination_type=peft_how, **extra)
    theirs.set_adapter("c")
    dt.combine(ours, dict(zip("ab", weights, strict=True)), "c", how=how, **kwargs)
    dt.set_active(ours, "c")
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), atol=1e-5)


def test_rslora_combines_to_the_dense_truth_where_peft_before_022_did_not(tmp_path: Path) -> None:
    """Ours is the dense truth. PEFT's svd result before 0.22 kept use_rslora with lora_alpha = r, so
    it scaled the truncated update by sqrt(r) instead of 1; PEFT 0.22 fixed it and now agrees."""
    theirs, ours = peft_pair(rslora=True, folder=tmp_path)
    theirs.add_weighted_adapter(
        list(PEFT_NAMES.values()), [1.0, 1.0], "c", combination_type="svd", svd_rank=8
    )
    theirs.set_adapter("c")
    dt.combine(ours, {"a": 1.0, "b": 1.0}, "c", how="svd", rank=8)
    dt.set_active(ours, ["a", "b"])
    with torch.no_grad():
        both = ours(X)
        dt.set_active(ours, "c")
        assert torch.allclose(ours(X), both, atol=1e-5)  # rank 8 holds the rank-4 + rank-4 sum
        fixed = Version(peft.__version__) >= Version("0.22")
        assert torch.allclose(theirs(X), both, atol=1e-3) == fixed


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: dt.combine(m, {}, "c"), "at least one adapter"),
        (lambda m: dt.combine(m, {"a": float("nan")}, "c"), "finite numbers"),
        (
            lambda m: dt.combine(m, {"a": 1.0}, "c", how="ties", density=0.0),
            r"density=0.0 must be in \(0, 1\]",
        ),
        (lambda m: dt.combine(m, {"a": 1.0}, "c", how="ties", density=1.5), r"must be in \(0, 1\]"),
        (lambda m: dt.combine(m, {"a": 1.0}, "c", how="ties"), "needs density="),
        (lambda m: dt.combine(m, {"a": 1.0}, "c", how="svd", density=0.5), "does not apply"),
        (lambda m: dt.combine(m, {"a": 1.0}, "c", how="mean"), "how must be one of"),
        (lambda m: dt.combine(m, {"a": 1.0}, "c", rank=0), "positive integer or 'full'"),
        (lambda m: dt.combine(m, {"a": 1.0, "z": 1.0}, "c"), "unknown adapter 'z'"),
        (lambda m: dt.combine(m, {"a": 1.0, "short": 1.0}, "c"), "does not adapt 'fc2'.*missing='zero'"),
        (
            lambda m: dt.combine(m, {"a": 1.0, "prompt": 1.0}, "c", missing="zero"),
            "not a change of the module",
        ),
        (lambda m: dt.combine(m, {"a": 1.0}, "a"), "already exists"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_added(call: Any, message: str) -> None:
    model = Net()
    dt.inject(model, dt.LoRA(rank=2), targets=TARGETS, name="a")
    dt.inject(model, dt.LoRA(rank=2), targets=["fc1"], name="short", activate=False)
    dt.inject(model, dt.Adapter(bottleneck=2), targets=["fc1"], name="prompt", activate=False)
    before = set(attachment_of(model).adapters)
    with pytest.raises(ValueError, match=message):
        call(model)
    assert set(attachment_of(model).adapters) == before


def test_missing_zero_lets_an_adapter_add_nothing_where_it_has_no_update() -> None:
    model = Net()
    dt.inject(model, dt.LoRA(rank=2), targets=TARGETS, name="a")
    dt.inject(model, dt.LoRA(rank=2), targets=["fc1"], name="short", activate=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    dt.combine(model, {"a": 1.0, "short": 1.0}, "c", missing="zero")
    updates = module_updates(model, "c", "test")
    assert isinstance(updates["fc2"], Factors) and updates["fc2"].rank == 2


def test_heads_of_other_tasks_stay_out_and_the_kept_one_comes_along(tmp_path: Any) -> None:
    """Adapters of tasks with other heads combine on one task's model: the others load without their
    module copies (load(..., module_copies=False)) and the result keeps that task's head."""
    g = torch.Generator().manual_seed(3)
    for task, labels in (("a", 3), ("b", 5)):
        model = Net()
        model.head = nn.Linear(16, labels)
        dt.inject(model, dt.LoRA(rank=2), targets=TARGETS, modules_to_save=["head"])
        with torch.no_grad():
            for p in dt.trainable_parameters(model):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        dt.save(model, tmp_path / task)
    model = Net()
    dt.load(model, tmp_path / "a", name="a")
    expected = model(X)
    with pytest.raises(ValueError):
        dt.load(model, tmp_path / "b", name="b", activate=False)  # its 5-label head does not fit
    dt.load(model, tmp_path / "b", name="b", activate=False, module_copies=False)
    with pytest.raises(ValueError, match="keep_modules_of"):
        dt.combine(model, {"a": 1.0, "b": 0.0}, "c")
    dt.combine(model, {"a": 1.0, "b": 0.0}, "c", keep_modules_of="a")
    dt.set_active(model, "c")
    assert attachment_of(model).info("c").modules_to_save == ("head",)
    assert torch.allclose(model(X), expected, atol=1e-5)


def test_an_update_beyond_the_weight_is_refused_not_dropped(tmp_path: Any) -> None:
    """BitFit trains biases and SAID may too: merge writes them, but a weight combination or a LoRA
    would silently lose them."""
    from deltatune.formats.lora import export_lora

    for method in (
        dt.BitFit(),
        dt.IntrinsicDimension(**{**dict(REGISTRY["intrinsic"].suite.example), "bias": True}),
    ):
        model = Net()
        dt.inject(model, method, targets=TARGETS, name="a")
        with torch.no_grad():
            for p in dt.trainable_parameters(model):
                p.add_(0.3)
        with pytest.raises(ValueError, match="changes the module's bias"):
            dt.combine(model, {"a": 1.0}, "c", rank="full")
        with pytest.raises(ValueError, match="changes the module's bias.*--to merged"):
            export_lora(model, tmp_path / type(method).__name__, approximate_rank=4)
