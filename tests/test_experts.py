"""LoRA on the fused experts of MoE models (targets that name 3-D expert weights).

Tiny random-config transformers models of four families: Mixtral, Qwen3-MoE and OLMoE (experts
``(experts, out, in)``, gate and up fused) and gpt-oss (transposed ``(experts, in, out)``, with biases
and an interleaved, clamped gate). The reference for every forward is transformers' own experts code
run on the weights with the dense update ``W[e] + s · B[e] A[e]`` written in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.targets import expert_weights

transformers = pytest.importorskip("transformers")

SHAPE = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def _gpt_oss() -> Any:
    return transformers.GptOssConfig(
        **SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8
    )


FAMILIES: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SHAPE, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **SHAPE, intermediate_size=24, num_experts=4, num_experts_per_tok=2
    ),
    "gpt_oss": _gpt_oss,
}
IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))


def tiny(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    experts = [m for m in model.modules() if expert_weights(m)]
    if not experts:
        pytest.skip(f"this transformers' {family} has no fused experts deltatune understands")
    if family == "gpt_oss" and not hasattr(experts[0], "has_gate"):
        pytest.skip("transformers < 5.2 runs gpt-oss's experts with dense (tokens, experts) scores")
    with torch.no_grad():  # (gpt-oss's random biases start at zero: give them values)
        for m in experts:
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).normal_(0, 0.1)
    return model


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(IDS).logits
        return out


def dense_reference(base: nn.Module, adapted: nn.Module, name: str = "default") -> nn.Module:
    """``base`` with every adapted expert weight replaced by ``W[e] + s · B[e] A[e]``, computed here
    from the factors (independently of deltatune's merge)."""
    ref = copy.deepcopy(base)
    att = dt.attachment_of(adapted)
    for path, layer in att.layers(name).items():
        module = ref.get_submodule(path)
        for weight, (A, B, s, _) in layer.expert_factors().items():
            delta = torch.einsum("eor,eri->eoi", B.detach(), A.detach()) * s
            if module.is_transposed:
                delta = delta.transpose(1, 2)
            getattr(module, weight).data += delta
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_experts_is_the_dense_update_and_merges_exactly(family: str) -> None:
    base = tiny(family)
    reference = logits(base)
    model = copy.deepcopy(base)
    att = dt.inject(model, dt.LoRA(rank=2, alpha=4), targets=["experts.gate_up_proj", "experts.down_proj"])
    assert all(type(att.wrappers[p].base).__name__.endswith("Experts") for p in att.info("default").targets)
    assert torch.allclose(logits(model), reference, atol=1e-6)  # B = 0: the base
    randomise(model)
    out = logits(model)
    assert not torch.allclose(out, reference, atol=1e-3)
    assert torch.allclose(out, logits(dense_reference(base, model)), atol=1e-5)
    merged = dt.merge(copy.deepcopy(model))
    assert not dt.has_adapters(merged)
    assert torch.allclose(logits(merged), out, atol=1e-5)
    assert torch.equal(logits(dt.unload(model)), reference)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_of_transformers_agrees(implementation: str) -> None:
    base = tiny("mixtral")
    if not hasattr(base.config, "_experts_implementation"):
        pytest.skip("this transformers has one experts implementation")
    model = copy.deepcopy(base)
    dt.inject(model, dt.LoRA(rank=2), targets=["experts"])
    randomise(model)
    reference = dense_reference(base, model)
    reference.config._experts_implementation = implementation
    try:
        expected = logits(reference)
    except (NotImplementedError, RuntimeError) as e:  # (grouped_mm where this torch has no CPU kernel)
        pytest.skip(f"{implementation} does not run here: {e}")
    assert torch.allclose(logits(model), expected, atol=1e-5)


def test_targets_name_single_weights_and_the_router_is_untouched() -> None:
    model = tiny("qwen3_moe")
    att = dt.inject(model, dt.LoRA(rank=2, alpha=4), targets=["down_proj", "q_proj"])
    targets = att.info("default").targets
    assert [p for p in targets if p.endswith("experts")] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]
    assert [p for p in targets if p.endswith("q_proj")] == [
        f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)
    ]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".factors.down_proj." in n for n in names if "experts" in n)
    assert not any("gate_up_proj.lora" in n or ".mlp.gate." in n for n in names)
    # closed form: per layer 4 experts x r (in + out) for down_proj (24 -> 16), plus q_proj's r (16 + 16)
    per_layer = 4 * 2 * (24 + 16) + 2 * (16 + 16)
    assert att.closed_form("default") == (2 * per_layer, 2 * per_layer * 4)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == 2 * per_layer
    router = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate." in n}
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.1)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, router[n]) for n, p in model.named_parameters() if n in router)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "factors.down_proj.lora_B" in n)


def test_shared_factor_counts_and_acts_for_every_expert() -> None:
    model = tiny("mixtral")
    att = dt.inject(model, dt.LoRA(rank=2, expert_shared="A"), targets=["experts.gate_up_proj"])
    layer = att.layers("default")["model.layers.0.mlp.experts"]
    assert layer.factors["gate_up_proj"].lora_A.shape == (1, 2, 16)
    assert layer.factors["gate_up_proj"].lora_B.shape == (4, 48, 2)
    per_layer = 2 * 16 + 4 * 48 * 2
    assert (
        att.closed_form("default")[0]
        == 2 * per_layer
        == sum(p.numel() for p in dt.trainable_parameters(model))
    )
    randomise(model)
    base = tiny("mixtral")
    assert torch.allclose(logits(model), logits(dense_reference(base, model)), atol=1e-5)


class Shapes(TorchDispatchMode):
    """The shape of every tensor the ops under it produce."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = not func._schema.is_mutable and all(r.alias_info is None for r in func._schema.returns)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if fresh and isinstance(t, torch.Tensor):  # (views of the weight, W[e], are not new)
                self.shapes.add(tuple(t.shape))
        return out


def test_the_forward_never_forms_a_dense_expert_update() -> None:
    """What PEFT's target_parameters does on every forward (W + s·B A for the whole stack), and what
    the kernel avoids: no op makes a fresh tensor the shape of an expert's weight or of the stack."""
    model = tiny("mixtral")
    dt.inject(model, dt.LoRA(rank=2), targets=["experts"])
    randomise(model)
    experts = model.model.layers[0].mlp.experts.base
    forbidden = {tuple(w.shape) for w in (experts.gate_up_proj, experts.down_proj)}
    forbidden |= {s[1:] for s in forbidden}
    with Shapes() as seen, torch.no_grad():
        model(IDS)
    assert not (seen.shapes & forbidden), sorted(seen.shapes & forbidden)


def test_adapters_stack_route_and_save_load(tmp_path: Path) -> None:
    base = tiny("mixtral")
    model = copy.deepcopy(base)
    dt.inject(model, dt.LoRA(rank=2), targets=["experts.down_proj"], name="a")
    dt.inject(model, dt.LoRA(rank=3, alpha=3), targets=["experts"], name="b", seed=1)
    randomise(model)
    with torch.no_grad():
        dt.set_active(model, "a")
        a = logits(model)
        dt.set_active(model, "b")
        b = logits(model)
        dt.set_active(model, ["a", "b"])
        both = logits(model)
        with dt.route(model, ["a", "b", None]):
            routed = logits(model)
    assert torch.allclose(routed[0], a[0], atol=1e-6) and torch.allclose(routed[1], b[1], atol=1e-6)
    assert torch.allclose(routed[2], logits(base)[2], atol=1e-6)
    two = dense_reference(dense_reference(base, model, "a"), model, "b")
    assert torch.allclose(both, logits(two), atol=1e-5)
    dt.save(model, tmp_path / "a", "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "expert_weights" in json.dumps(config)  # the selection travels with the file
    fresh = copy.deepcopy(base)
    dt.load(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), a)
    layer = dt.attachment_of(fresh).layers("a")["model.layers.1.mlp.experts"]
    assert list(layer.factors) == ["down_proj"]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_peft_target_parameters_both_ways(family: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny(family)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    try:
        theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    except (TypeError, ValueError) as e:  # (a PEFT before target_parameters)
        pytest.skip(f"this PEFT has no target_parameters: {e}")
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    dt.import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(IDS).logits
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    assert torch.allclose(logits(ours), expected, atol=1e-5)
    if not swaps_in_out(peft):
        pytest.skip("this PEFT defines LoRA on (experts, out, in) weights transposed; ours is the later form")
    dt.export_peft(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, expected, atol=1e-5)


def swaps_in_out(peft: Any) -> bool:
    """Whether PEFT's ParamWrapper takes an (experts, out, in) weight's fan-in as its "in" (as ours;
    peft 0.18 took dim 1: its files import here, converted, but ours do not load there)."""
    import inspect

    return "_did_swap_in_out_features" in inspect.getsource(peft.tuners.lora.layer.ParamWrapper)


def test_a_shared_factor_exports_to_peft_as_copies(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    if not swaps_in_out(peft):
        pytest.skip("this PEFT defines LoRA on (experts, out, in) weights transposed")
    base = tiny("mixtral")
    model = copy.deepcopy(base)
    dt.inject(model, dt.LoRA(rank=2, expert_shared="B"), targets=["experts.down_proj"])
    randomise(model)
    dt.export_peft(model, tmp_path / "p")
    try:
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    except (TypeError, ValueError) as e:
        pytest.skip(f"this PEFT has no target_parameters: {e}")
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, logits(model), atol=1e-5)


class Odd(nn.Module):
    """A module with a 3-D weight and no experts contract."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2, 3, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


@pytest.mark.parametrize(
    "make,method,targets,message",
    [
        (lambda: tiny("mixtral"), dt.LoRA(), ["experts.gate_proj"], "close module names: gate_up_proj"),
        (lambda: nn.Sequential(Odd()), dt.LoRA(), ["table"], "whose layout deltatune does not understand"),
        (lambda: tiny("mixtral"), dt.LoRAFA(), ["experts.down_proj"], "MixtralExperts"),
        (lambda: tiny("mixtral"), dt.Adapter(), ["experts.down_proj"], "as a whole module"),
        (lambda: tiny("mixtral"), dt.LoRA(init=dt.PiSSA()), ["experts"], "initialises from a 2-D weight"),
        (lambda: tiny("mixtral"), dt.LoRA(expert_weights=("up_proj",)), ["experts"], "does not have"),
    ],
)
def test_bad_expert_targets_are_refused_by_name(
    make: Callable[[], nn.Module], method: Any, targets: list[str], message: str
) -> None:
    model = make()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dt.inject(model, method, targets=targets)
    assert not dt.has_adapters(model)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_dropout_cannot_go_to_peft_and_routing_weights_must_be_per_choice(tmp_path: Path) -> None:
    model = tiny("mixtral")
    dt.inject(model, dt.LoRA(rank=2, dropout=0.1), targets=["experts"])
    with pytest.raises(ValueError, match="refuses lora_dropout"):
        dt.export_peft(model, tmp_path / "p")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(5, 16)
    with pytest.raises(ValueError, match=r"routing indices \(5, 2\) and weights \(5, 4\)"):
        experts(hidden, torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 4))


@pytest.mark.parametrize("family,extra", [("mixtral", []), ("qwen3_moe", ["--expert-shared", "A"])])
def test_deltatune_train_adapts_the_experts(family: str, extra: list[str], tmp_path: Path) -> None:
    from deltatune.cli.main import main
    from tiny_chat import save_tiny_chat_llama

    folder = save_tiny_chat_llama(tmp_path / "model", family=family)
    rows = [
        {"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(12)
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    args = ["train", "--model", folder, "--data", str(tmp_path / "chat.jsonl"), "--method", "lora"]
    args += ["--targets", "experts.gate_up_proj", "experts.down_proj", "--rank", "4", "--steps", "2"]
    args += ["--batch-size", "4", "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    att = dt.load(model, out / "adapter")
    (name,) = att.adapters
    assert att.info(name).targets == ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    record = json.loads((out / "metrics.json").read_text())
    assert (
        record["trainable_parameters"]
        == att.closed_form(name)[0]
        == sum(p.numel() for layer in att.layers(name).values() for p in layer.parameters())
    )


def test_combine_and_lora_exports_refuse_expert_updates_by_name(tmp_path: Path) -> None:
    model = tiny("mixtral")
    dt.inject(model, dt.LoRA(rank=2), targets=["experts"], name="a")
    dt.inject(model, dt.LoRA(rank=2), targets=["experts"], name="b", seed=1)
    for call in (
        lambda: dt.combine(model, {"a": 1.0, "b": 1.0}, "c"),
        lambda: dt.export_lora(model, tmp_path, "a"),
    ):
        with pytest.raises(ValueError, match="3-D weights of fused MoE experts"):
            call()
    assert sorted(dt.attachment_of(model).adapters) == ["a", "b"]
