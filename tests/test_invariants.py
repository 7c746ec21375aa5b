"""The invariants of DESIGN.md, over every registered method x every toy model.

This file names no method: a method joins by registering. What differs between methods is read
from their declared capabilities (``mergeable``, ``identity_at_init``, ``weight_space``,
``supports_mixed_batch``, ``layer_types``) and from the constraints declared on their fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY, hooks, merged_linear
from deltatune.contract.fields import Check, from_jsonable
from deltatune.formats.peft import peft_type_of
from deltatune.runtime.wrapper import Adapted, attachment_of
from deltatune.targets import module_kind, shape_of
from toy_models import TOYS, Toy

METHODS = sorted(REGISTRY.items())


class Variant:
    """A registered method class seen with one of its declared ``variants`` (e.g. another initialiser).

    ``cls.suite.variants`` maps a label to ``{"fields": {...}, **capabilities}``: the fields replace
    the suite's ``example`` (JSON form, so initialiser objects are ``{"type": ...}``), the other keys refine
    the class's capabilities for that variant (e.g. ``layer_types``). Everything else reads through.
    """

    def __init__(self, cls: type, spec: dict[str, Any]) -> None:
        self.cls = cls
        fields = spec["fields"]
        if spec.get("calibration"):
            # The variant needs calibration data (input covariances of the layers): the string
            # "<calibration>" in its fields becomes a file made from every toy's own inputs.
            text = json.dumps(fields).replace('"<calibration>"', json.dumps(calibration_file()))
            fields = json.loads(text)
        facts = {k: spec[k] for k in ("near_identity_at_init", "random_init") if k in spec}
        example = {k: from_jsonable(v, k) for k, v in fields.items()}
        self.suite = dataclasses.replace(cls.suite, example=example, **facts)  # type: ignore[attr-defined]
        skip = ("fields", "calibration", *facts)
        self.__dict__.update({k: v for k, v in spec.items() if k not in skip})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cls, name)

    def __call__(self, **kwargs: Any) -> Any:
        return self.cls(**kwargs)


_CALIBRATION: list[str] = []


def calibration_file() -> str:
    """Input covariances of every linear layer of every (non-transformers) toy, on its own inputs."""
    if not _CALIBRATION:
        covariances: dict[str, torch.Tensor] = {}
        for toy in TOYS:
            if toy.transformers:
                continue
            model = toy.build()
            linears = [p for p, m in model.named_modules() if module_kind(m) in ("linear", "conv1d")]
            inputs = [toy.inputs(torch.Generator().manual_seed(i)) for i in range(2)]
            covariances.update(dt.collect_covariance(model, inputs, linears))
        folder = Path(tempfile.mkdtemp(prefix="deltatune-calibration-"))
        from safetensors.torch import save_file

        save_file(covariances, str(folder / "covariance.safetensors"))
        _CALIBRATION.append(str(folder / "covariance.safetensors"))
    return _CALIBRATION[0]


def _cases() -> list[Any]:
    out = []
    for name, cls in METHODS:
        kinds: list[tuple[str, Any]] = [(name, cls)]
        variants = cls.suite.variants
        kinds += [(f"{name}[{label}]", Variant(cls, spec)) for label, spec in variants.items()]
        out += [
            pytest.param(c, toy, id=f"{label}-{toy.name}")
            for label, c in kinds
            for toy in TOYS
            # Toys built from transformers configs are for methods that act on a whole model
            # (input embeddings, attention masks, KV cache: the ``model_level`` capability).
            if not toy.transformers or c.model_level
        ]
    return out


CASES = _cases()


def example(cls: type) -> Any:
    """The method's configuration for tiny models (its suite's declared ``example``)."""
    return cls(**cls.suite.example)


def supported_targets(cls: type, model: nn.Module) -> list[str]:
    """The method's ``default_targets`` where it declares them and they exist on this model, else
    every module of a supported kind that is not inside another one (a block, not its linears too)
    and that the method ``accepts`` if it declares that (e.g. only layers that have a bias)."""
    method = hooks(example(cls))
    try:
        declared = method.default_targets(model)
    except ValueError:
        declared = None  # e.g. a model deltatune.anatomy does not know
    if declared is not None:
        return list(declared)
    accepts = method.accepts
    quantized_ok = cls.quantized_base  # 4-bit bases only for methods that say so
    paths = [
        p
        for p, m in model.named_modules()
        if p and module_kind(m) in cls.layer_types and (quantized_ok or not getattr(m, "quantized", False))
    ]
    outermost = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    return [p for p in outermost if accepts(model.get_submodule(p))]


def injected(cls: type, toy: Toy, seed: int = 0, **kw: Any) -> tuple[nn.Module, list[str]]:
    model = toy.build()
    saved = kw.get("modules_to_save", ())
    paths = [p for p in supported_targets(cls, model) if p not in saved]
    if not paths:
        pytest.skip(f"no module of {toy.name} left for {cls.__name__} to adapt")
    dt.inject(model, example(cls), targets=paths, seed=seed, **kw)
    return model, paths


def zero_update(model: nn.Module) -> bool:
    """Whether every layer's update is exactly zero at init (e.g. a zero factor), so outputs are bit-exact.

    Otherwise (an update taken out of the weight and subtracted again) the output equals
    the base's up to rounding.
    """
    layers = dt.attachment_of(model).layers("default").values()
    return all((d := la.delta_weight()) is None or not d.any() for la in layers)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor's float values; a quantised tensor subclass (NF4) gives its dequantised form."""
    original = getattr(t, "get_original_weight", None)
    return original() if callable(original) else t


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors: everything but adapter layers and adapter-shared state."""
    return {k: v for k, v in model.state_dict().items() if ".adapters." not in k and ".shared." not in k}


def perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every adapter parameter away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def x_for(toy: Toy, seed: int = 0) -> torch.Tensor:
    return toy.inputs(torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_identity_at_init(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    expected = toy.build()(x)
    model, _ = injected(cls, toy)
    out = model(x)
    if cls.identity_at_init:
        assert torch.equal(out, expected) if zero_update(model) else close(out, expected)
    elif cls.suite.near_identity_at_init:
        # Not exactly the base, but a small step away from it.
        assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    else:
        # Far from the base at once (e.g. extra input tokens), but the same kind of output.
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert not torch.equal(out, expected)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_disabled_gives_base_and_restores(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    base_out = toy.build()(x)
    model, _ = injected(cls, toy)
    perturb(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    with dt.disabled(model):
        assert torch.equal(model(x), base_out)
        with dt.disabled(model):
            assert torch.equal(model(x), base_out)
        assert torch.equal(model(x), base_out)  # the inner block restored "disabled", not "enabled"
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="boom"), dt.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_only_adapter_trains(cls: type, toy: Toy) -> None:
    model, _ = injected(cls, toy)
    trainable = dt.trainable_parameters(model)
    assert trainable
    requiring = {id(p) for p in model.parameters() if p.requires_grad}
    assert requiring == {id(p) for p in trainable}
    base_before = {k: plain(v).clone() for k, v in base_state(model).items()}
    adapter_before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(2):
        out = model(x_for(toy, step))
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(plain(after[k]), v), f"base tensor {k} changed"
    assert any(not torch.equal(p, q) for p, q in zip(trainable, adapter_before, strict=True))


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_training_after_an_inference_mode_forward(cls: type, toy: Toy) -> None:
    """Evaluating under torch.inference_mode between steps (as a training loop's eval does) leaves
    nothing behind that autograd would refuse, and the gradients equal those without it."""
    grads = []
    for evaluate_first in (False, True):
        model, _ = injected(cls, toy)
        perturb(model)
        if evaluate_first:
            model.eval()
            with torch.inference_mode():
                model(x_for(toy, 1))
        model.train()
        torch.manual_seed(0)  # dropout, where a method has it, draws the same masks
        model(x_for(toy)).float().pow(2).mean().backward()
        grads.append([p.grad for p in dt.trainable_parameters(model)])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_merge(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    model, _ = injected(cls, toy)
    perturb(model)
    if not cls.mergeable:
        with pytest.raises(ValueError, match="not mergeable"):
            dt.merge(model)
        return
    expected = model(x)
    # dequantize: quantised (4-bit) bases become float modules; a no-op for float bases.
    merged = dt.merge(model, dequantize=True)
    assert not any(isinstance(m, Adapted) for m in merged.modules())
    assert not dt.has_adapters(merged)
    assert close(merged(x), expected)
    with pytest.raises(ValueError, match="no deltatune adapters"):
        dt.merge(merged)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_forward_matches_delta_weight(cls: type, toy: Toy) -> None:
    if not cls.weight_space:
        pytest.skip("not a weight-space method")
    model, _ = injected(cls, toy)
    perturb(model)
    att = attachment_of(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        w.register_forward_hook(lambda m, a, out, path=path: seen.__setitem__(path, (a[0], out)))
        for path, w in att.wrappers.items()
    ]
    model(x_for(toy))
    for h in hooks:
        h.remove()
    assert set(seen) == set(att.wrappers)
    for path, (inp, out) in seen.items():
        wrapper = att.wrappers[path]
        layer = wrapper.adapters["default"]
        base = wrapper.base.dequantize() if getattr(wrapper.base, "quantized", False) else wrapper.base
        reference = merged_linear(base, layer.delta_weight())
        # A weight-space layer that also moves the bias says so with ``delta_bias()`` (None: it does not).
        delta_bias = layer.delta_bias() if hasattr(layer, "delta_bias") else None
        if delta_bias is not None:
            reference.bias = nn.Parameter(wrapper.base.bias + delta_bias)
        assert close(out, reference(inp)), path


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_unload_restores_exactly(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    model = toy.build()
    original_modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = model(x)
    paths = supported_targets(cls, model)
    if not paths:
        pytest.skip("no supported module")
    dt.inject(model, example(cls), targets=paths)
    perturb(model)
    dt.unload(model)
    assert dict(model.named_modules()).keys() == original_modules.keys()
    for name, module in model.named_modules():
        assert module is original_modules[name]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(x), expected)
    assert not dt.has_adapters(model)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_save_load_roundtrip_and_closed_form(cls: type, toy: Toy, tmp_path: Path) -> None:
    x = x_for(toy)
    model, _ = injected(cls, toy, modules_to_save=[toy.head] if toy.head else ())
    perturb(model)
    expected = model(x)
    dt.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]

    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert not any(".base." in k for k in tensors)
    att = attachment_of(model)
    trainable, stored_bytes = att.closed_form("default")
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == trainable
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored_bytes
    assert dt.parameter_report(model).stored_bytes == stored_bytes
    # No base weight is in the file: the stored bytes are exactly the adapter's.
    base_values = {plain(v).detach().numpy().tobytes() for v in base_state(model).values()}
    assert not any(t.numpy().tobytes() in base_values for t in tensors.values() if t.numel() > 4)

    fresh = toy.build()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    trained_again = toy.build()
    dt.load(trained_again, tmp_path, trainable=True)
    assert {id(p) for p in trained_again.parameters() if p.requires_grad} == {
        id(p) for p in dt.trainable_parameters(trained_again)
    }
    assert len(dt.trainable_parameters(trained_again)) > 0


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_new_modules_take_the_models_training_mode(cls: type, toy: Toy, tmp_path: Path) -> None:
    """An adapter injected into, or loaded onto, a model in eval mode runs in eval mode (no dropout);
    into a model in training mode, in training mode."""
    model, _ = injected(cls, toy)
    perturb(model)
    dt.save(model, tmp_path)
    for training in (False, True):
        fresh = toy.build().train(training)
        dt.load(fresh, tmp_path)
        assert {m.training for m in fresh.modules()} == {training}
        evaluating = toy.build().eval()
        dt.inject(evaluating, example(cls), targets=dt.attachment_of(model).info("default").targets)
        assert not any(m.training for m in evaluating.modules())


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_bad_config_fields_name_the_field(cls: type, toy: Toy) -> None:
    for f in dataclasses.fields(example(cls)):
        check = f.metadata.get("check")
        assert isinstance(check, Check), f"{cls.__name__}.{f.name} declares no constraint"
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{f.name} must be"):
            cls(**{f.name: check.counterexample()})
        if check.accepts_non_finite():  # (a field that opts in: Float(..., finite=False))
            continue
        for value in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{f.name} must be .*, got -?(nan|inf)"):
                cls(**{f.name: value})


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_bad_targets_name_the_module(cls: type, toy: Toy) -> None:
    model = toy.build()
    with pytest.raises(ValueError, match="'no_such_module' matched no module"):
        dt.inject(model, example(cls), targets=["no_such_module"])
    unsupported = [p for p, m in model.named_modules() if p and module_kind(m) not in cls.layer_types]
    bad = next(p for p in unsupported if not list(model.get_submodule(p).children()))
    with pytest.raises(ValueError, match=rf"'{bad}' is"):
        dt.inject(model, example(cls), targets=[bad])
    assert not dt.has_adapters(model)  # a refused inject leaves no trace
    paths = supported_targets(cls, model)
    if paths:
        dt.inject(model, example(cls), targets=paths)
        with pytest.raises(ValueError, match="already exists"):
            dt.inject(model, example(cls), targets=paths)
        with pytest.raises(ValueError, match="unknown adapter 'nope'"):
            dt.set_active(model, "nope")


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_seeded_init_leaves_global_rng_alone(cls: type, toy: Toy) -> None:
    a, b, c = toy.build(), toy.build(), toy.build()
    paths = supported_targets(cls, a)
    if not paths:
        pytest.skip("no supported module")
    rng = torch.get_rng_state()
    dt.inject(a, example(cls), targets=paths, seed=3)
    dt.inject(b, example(cls), targets=paths, seed=3)
    dt.inject(c, example(cls), targets=paths, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb, sc = (dt.adapter_state(m, "default") for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # ``Suite.random_init`` (default True): the init draws random numbers, so another seed gives another.
    if cls.suite.random_init:
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    else:
        assert all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_named_adapters_switch_and_delete(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    base_out = toy.build()(x)
    model, paths = injected(cls, toy)
    perturb(model, seed=1)
    out_default = model(x)
    dt.inject(model, example(cls), targets=paths, name="second", seed=1)
    perturb(model, seed=2)
    out_second = model(x)
    assert not torch.allclose(out_second, out_default)
    dt.set_active(model, "default")
    assert torch.equal(model(x), out_default)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in attachment_of(model).info("default").trainable
    }
    dt.delete_adapter(model, "default")
    assert dt.attachment_of(model).active == ()
    assert torch.equal(model(x), base_out)
    dt.set_active(model, "second")
    assert torch.equal(model(x), out_second)
    dt.delete_adapter(model, "second")
    assert not dt.has_adapters(model)
    assert not any(isinstance(m, Adapted) for m in model.modules())


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_mixed_batch_routing(cls: type, toy: Toy) -> None:
    x = x_for(toy)
    model, paths = injected(cls, toy)
    dt.inject(model, example(cls), targets=paths, name="other", seed=5)
    perturb(model, seed=3)
    dt.set_active(model, "default")
    perturb(model, seed=4)
    names: list[str | None] = [["default", "other", None][i % 3] for i in range(x.shape[0])]
    if not cls.supports_mixed_batch:
        with pytest.raises(ValueError, match="route"), dt.route(model, names):
            pass
        return
    dt.set_active(model, "default")
    by_default = model(x)
    dt.set_active(model, "other")
    by_other = model(x)
    with dt.disabled(model):
        by_base = model(x)
    with dt.route(model, names):
        mixed = model(x)
    expected = torch.stack(
        [{"default": by_default, "other": by_other, None: by_base}[n][i] for i, n in enumerate(names)]
    )
    assert close(mixed, expected)
    with dt.route(model, names), torch.no_grad():  # serving: each adapter's rows added in place
        assert close(model(x), expected)
    with dt.route(model, ["other"] * x.shape[0]):  # one adapter for every row: no gather
        assert close(model(x), by_other)


def bf16_toy(cls: type, toy: Toy) -> tuple[nn.Module, list[str], torch.Tensor]:
    """The toy in bf16, the modules the method adapts on it (skips where none), and its input in bf16
    (token ids stay integers)."""
    model = toy.build().to(torch.bfloat16)
    paths = supported_targets(cls, model)
    if not paths:
        pytest.skip("no supported module")
    x = x_for(toy)
    return model, paths, x.to(torch.bfloat16) if x.is_floating_point() else x


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_low_precision_base_keeps_fp32_adapter(cls: type, toy: Toy) -> None:
    model, paths, x = bf16_toy(cls, toy)
    expected = model(x)
    dt.inject(model, example(cls), targets=paths)
    assert all(p.dtype == torch.float32 for p in dt.trainable_parameters(model))
    out = model(x)
    assert out.dtype == torch.bfloat16
    if cls.identity_at_init:
        if zero_update(model):
            assert torch.equal(out, expected)
        else:
            assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    perturb(model)
    model(x).float().sum().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_bf16_activations_stay_bf16(cls: type, toy: Toy) -> None:
    """The precision policy (deltatune.kernels.lowrank): on a bf16 model the adapter path computes in bf16,
    casting its small float32 tensors, never the activations: autograd keeps no float32 activation,
    and the output is within bf16 rounding of the same adapter computed in float32 ("adapter"
    policy)."""
    if cls.model_level:
        pytest.skip("the layer runs the whole body, whose own float32 steps (RMSNorm) are the model's")
    model, paths, x = bf16_toy(cls, toy)
    dt.inject(model, example(cls), targets=paths)
    perturb(model)
    # The rank-r intermediate of a layer fed token ids (an embedding) computes in the adapter's dtype:
    # the policy follows a floating input; only tensors as wide as an adapted module count.
    bases = [attachment_of(model).wrappers[p].base for p in paths]
    kinds = ("linear", "conv1d", "embedding")
    widths = [min(shape_of(m)) for b in bases for m in b.modules() if module_kind(m) in kinds]
    narrowest = min(widths, default=0)
    # An activation: a tensor laid out by the input's examples and positions (its leading dims are the
    # input's, or their product), not a parameter-shaped one (SAID's ΔW is computed in float32).
    lead = tuple(x.shape[:-1]) if x.is_floating_point() else tuple(x.shape)
    tokens = math.prod(lead)
    wide: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shaped = t.dim() >= 2 and (tuple(t.shape[: len(lead)]) == lead or t.shape[0] == tokens)
        shaped = shaped and t.shape[-1] >= narrowest
        if t.dtype == torch.float32 and shaped:
            wide.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert not wide, f"float32 activations kept for backward: {wide[:4]}"
    with dt.adapter_precision_as("adapter"):
        reference = model(x).float()
    error = float((out.float() - reference).abs().max())
    assert error <= 0.02 * float(reference.abs().max()) + 0.02, error


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_config_round_trips_through_json(cls: type, toy: Toy, tmp_path: Path) -> None:
    model, _ = injected(cls, toy)
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == cls.name
    rebuilt = dt.contract.method_from_config(config["method"], config["config"])
    # A method may record itself as another config in the file (``stored_method``).
    assert rebuilt == hooks(example(cls)).stored_method()
    config["config"]["no_such_field"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no_such_field"):
        dt.load(copy.deepcopy(toy.build()), tmp_path)


def whole_state(model: nn.Module) -> dict[str, Any]:
    """Everything a refused verb must leave as it was: every module (the same object), every
    parameter's and buffer's requires_grad, dtype and device, which adapters exist and are active."""
    att = dt.attachment_of(model) if dt.has_adapters(model) else None
    return {
        "modules": {n: (id(m), type(m), m.training) for n, m in model.named_modules()},
        "parameters": {n: (id(p), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()},
        "buffers": {n: (b.dtype, b.device) for n, b in model.named_buffers()},
        "active": None if att is None else att.active,
        "adapters": None if att is None else {n: len(i.trainable) for n, i in att.adapters.items()},
        "wrappers": None if att is None else {p: id(w) for p, w in att.wrappers.items()},
    }


def _fail_on_call(real: Any, k: int) -> Any:
    """``real``, except that from its ``k``-th call on it raises (after the earlier ones did their work)."""
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= k:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return failing


def _spoil(folder: Path, file: str, how: str) -> None:
    """Remove one tensor of a saved adapter, or give one another shape."""
    from safetensors.torch import save_file

    tensors = load_file(str(folder / file))
    key = sorted(k for k in tensors if tensors[k].dim() > 0)[0]
    if how == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


@pytest.mark.parametrize(("cls", "toy"), CASES)
def test_a_failed_verb_changes_nothing(cls: type, toy: Toy, tmp_path: Path) -> None:
    """Every verb is all-or-nothing: made to fail part-way (a spoilt file, a bad argument, or a step
    that raises after the earlier ones have run), it leaves modules, active adapters, requires_grad
    flags, dtypes, devices and outputs exactly as they were."""
    x = x_for(toy)
    model, paths = injected(cls, toy)
    perturb(model, seed=1)
    dt.inject(model, example(cls), targets=paths, name="other", seed=2, activate=False)
    with torch.no_grad():
        for p in attachment_of(model).info("other").trainable:
            p.add_(0.05)
    assert attachment_of(model).active == ("default",)

    def unchanged(verb: Any, *args: Any, **kwargs: Any) -> None:
        before, expected = whole_state(model), model(x)
        with pytest.raises(Exception):  # noqa: B017 (any refusal; what matters is what is left)
            verb(*args, **kwargs)
        assert whole_state(model) == before, verb
        assert torch.equal(model(x), expected), verb

    # load and import_peft under a new name while "default" is active: the adapter is injected,
    # then its tensors are refused.
    for how in ("missing", "shape"):
        folder = tmp_path / f"native-{how}"
        dt.save(model, folder)
        _spoil(folder, "adapter.safetensors", how)
        unchanged(dt.load, model, folder, name="b")
        if peft_type_of(example(cls)) is not None:
            folder = tmp_path / f"peft-{how}"
            try:
                dt.export_peft(model, folder, task_type="SEQ_CLS")
            except ValueError:
                pass  # no PEFT form for this model
            else:
                _spoil(folder, "adapter_model.safetensors", how)
                unchanged(dt.import_peft, model, folder, name="b")

    # inject: bad arguments, and a failure at its last step (switching to the new adapter).
    unchanged(dt.inject, model, example(cls), targets=paths, name="default")
    unchanged(dt.inject, model, example(cls), targets=["no_such_module"], name="b")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(
            dt.runtime.wrapper.Attachment,
            "set_active",
            _fail_on_call(dt.runtime.wrapper.Attachment.set_active, 1),
        )
        unchanged(dt.inject, model, example(cls), targets=paths, name="b")

    # set_active, route, combine: bad arguments.
    unchanged(dt.set_active, model, ["other", "nope"])
    unchanged(dt.set_active, model, ["other", "other"])
    unchanged(lambda: dt.route(model, ["default", "nope"]).__enter__())
    if cls.supports_mixed_batch:

        def routed_with_a_wrong_batch() -> None:
            with dt.route(model, ["other"] * (x.shape[0] + 1)):
                model(x)

        unchanged(routed_with_a_wrong_batch)
    unchanged(dt.combine, model, {"default": 1.0, "nope": 1.0}, "c")
    unchanged(dt.combine, model, {"default": 1.0, "other": 1.0}, "default")
    if cls.combinable:
        with pytest.MonkeyPatch.context() as m:  # fails once the combined layers are in place
            m.setattr(dt.runtime.compose, "AdapterInfo", _fail_on_call(dt.runtime.compose.AdapterInfo, 1))
            unchanged(dt.combine, model, {"default": 1.0, "other": -0.5}, "c")

    # merge, unload, delete_adapter: bad arguments, and a failure at their last step.
    unchanged(dt.merge, model, "nope")
    unchanged(dt.delete_adapter, model, "nope")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dt.runtime.core, "_detach", _fail_on_call(dt.runtime.core._detach, 1))
        unchanged(dt.merge, model, ["default", "other"], dequantize=True)
        unchanged(dt.unload, model)
        dt.delete_adapter(model, "other")  # (the last adapter's deletion detaches)
        unchanged(dt.delete_adapter, model, "default")

    # quantize: where a linear base is quantisable, with the last module's NF4 failing.
    quant = pytest.importorskip("deltatune.runtime.quant")
    linear = [p for p, mod in base_modules_of(model).items() if type(mod) is nn.Linear]
    if linear:
        unchanged(quant.quantize, model, linear, block_size=7)
        with pytest.MonkeyPatch.context() as m:
            real = quant.NF4Linear.from_weight
            m.setattr(quant.NF4Linear, "from_weight", _fail_on_call(real, len(linear)))
            unchanged(quant.quantize, model, linear)
        if not (cls.mergeable and cls.quantized_base):
            return
        try:
            quant.quantize(model, linear)
        except ValueError:
            return  # (e.g. a weight whose size does not split into NF4 blocks)
        unchanged(dt.merge, model)  # a quantised base needs dequantize=True


def base_modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return dt.runtime.wrapper.base_modules(model, attachment_of(model))
