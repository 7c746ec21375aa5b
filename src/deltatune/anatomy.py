"""Where the parts of common transformers models live: embeddings, blocks, attention and FFN.

Methods that go to a *kind* of place rather than to named modules (bottleneck adapters after every
attention and FFN output, BitFit on the query biases, partial fine-tuning of the last blocks, and
prompt/prefix tuning, which need the embeddings and the number of layers and heads) ask this module.

An :class:`Anatomy` is a small description made of paths: ``embeddings`` and ``blocks`` relative to
the *body* of the model (``BertModel`` inside ``BertForSequenceClassification``, found
automatically), the others relative to one block. Known anatomies are looked up by
``config.model_type`` (BERT and MiniLM, RoBERTa, GPT-2, Llama and SmolLM2), then by the model's
class name, then by structure (the first known anatomy whose paths all exist). Describe your own
model by passing an :class:`Anatomy`, or :func:`register` it under your ``model_type`` or class name.

Example:
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.attn_out = nn.Linear(8, 8)
    ...         self.up = nn.Linear(8, 32)
    ...         self.down = nn.Linear(32, 8)
    >>> class Net(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.tok = nn.Embedding(10, 8)
    ...         self.blocks = nn.ModuleList([Block(), Block()])
    >>> mine = Anatomy(embeddings="tok", blocks="blocks", attention_output="attn_out",
    ...                ffn_input=("up",), ffn_output="down", num_heads=2)
    >>> parts = describe(Net(), mine)
    >>> parts.num_layers, parts.hidden_size, parts.num_heads
    (2, 8, 2)
    >>> parts.paths("ffn_output")
    ['blocks.0.down', 'blocks.1.down']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from .contract.layer import Wrapped
from .targets import name_matches


@dataclass(frozen=True)
class Anatomy:
    """Paths that locate the parts of a transformer.

    Args:
        embeddings: the token embedding (``nn.Embedding``), relative to the body.
        blocks: the ``nn.ModuleList`` of transformer blocks, relative to the body.
        attention_output: in a block, the attention's output projection.
        ffn_input: in a block, the FFN's input projection(s) (Llama has two: gate and up).
        ffn_output: in a block, the FFN's output projection.
        query: in a block, the query projection (GPT-2's fused ``c_attn`` holds q, k and v), or None.
        ffn: in a block, one module mapping the FFN's input to its output (GPT-2's and Llama's
            ``mlp``), or None when the FFN is split across modules (BERT's ``intermediate`` and
            ``output``, whose LayerNorm also adds the residual).
        num_heads: attention heads, for models without a ``config`` that says so.
    """

    embeddings: str
    blocks: str
    attention_output: str
    ffn_input: tuple[str, ...]
    ffn_output: str
    query: str | None = None
    ffn: str | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        for f in ("embeddings", "blocks", "attention_output", "ffn_output"):
            value = getattr(self, f)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Anatomy.{f} must be a non-empty module path, got {value!r}")
        if (
            not isinstance(self.ffn_input, tuple)
            or not self.ffn_input
            or not all(isinstance(p, str) and p for p in self.ffn_input)
        ):
            raise ValueError(f"Anatomy.ffn_input must be a non-empty tuple of paths, got {self.ffn_input!r}")
        for f in ("query", "ffn"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"Anatomy.{f} must be a module path or None, got {value!r}")
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise ValueError(f"Anatomy.num_heads must be an integer >= 1 or None, got {self.num_heads!r}")


_BERT = Anatomy(
    embeddings="embeddings.word_embeddings",
    blocks="encoder.layer",
    attention_output="attention.output.dense",
    ffn_input=("intermediate.dense",),
    ffn_output="output.dense",
    query="attention.self.query",
)
_GPT2 = Anatomy(
    embeddings="wte",
    blocks="h",
    attention_output="attn.c_proj",
    ffn_input=("mlp.c_fc",),
    ffn_output="mlp.c_proj",
    query="attn.c_attn",
    ffn="mlp",
)
_LLAMA = Anatomy(
    embeddings="embed_tokens",
    blocks="layers",
    attention_output="self_attn.o_proj",
    ffn_input=("mlp.gate_proj", "mlp.up_proj"),
    ffn_output="mlp.down_proj",
    query="self_attn.q_proj",
    ffn="mlp",
)

#: Known anatomies by ``config.model_type`` or model class name (add yours with :func:`register`).
KNOWN: dict[str, Anatomy] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}

PARTS = ("attention_output", "ffn_input", "ffn_output", "query", "ffn")


def register(key: str, anatomy: Anatomy) -> None:
    """Make ``anatomy`` the one used for models whose ``config.model_type`` or class name is ``key``."""
    if not isinstance(anatomy, Anatomy):
        raise ValueError(f"register: anatomy must be an Anatomy, got {type(anatomy).__name__}")
    KNOWN[key] = anatomy


@dataclass(frozen=True)
class Parts:
    """The located parts of one model (paths are full paths from the model root)."""

    anatomy: Anatomy
    body: str  # path of the module the anatomy's embeddings/blocks are relative to ("" = the root)
    embeddings: str
    blocks: tuple[str, ...]
    hidden_size: int
    num_heads: int | None
    num_kv_heads: int | None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_dim(self) -> int | None:
        return None if self.num_heads is None else self.hidden_size // self.num_heads

    def paths(self, *parts: str, layers: tuple[int, ...] | None = None) -> list[str]:
        """Full paths of the named block parts (see :data:`PARTS`) in every block, or in ``layers``.

        Raises:
            ValueError: an unknown part name, or a part this anatomy does not have (e.g. ``ffn`` on BERT).
        """
        out: list[str] = []
        chosen = range(len(self.blocks)) if layers is None else layers
        for i in chosen:
            if not 0 <= i < len(self.blocks):
                raise ValueError(f"layer {i} does not exist; the model has {len(self.blocks)} blocks")
            for part in parts:
                if part not in PARTS:
                    raise ValueError(f"unknown anatomy part {part!r}; parts: {', '.join(PARTS)}")
                value = getattr(self.anatomy, part)
                if value is None:
                    raise ValueError(f"this model's anatomy has no {part!r} (Anatomy.{part} is None)")
                for rel in value if isinstance(value, tuple) else (value,):
                    out.append(f"{self.blocks[i]}.{rel}")
        return out


def named_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``module.named_modules()`` seen through deltatune wrappers: an adapted module shows as its
    original (``base``) under its own path, and adapter layers are not listed."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for path, m in module.named_modules(prefix=prefix):
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(m, Wrapped):
            out.append((path, m.base))
            skip.append(path + ".")
            continue
        out.append((path, m))
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _body(model: nn.Module, anatomy: Anatomy) -> str | None:
    """The shortest path ``b`` such that ``b.blocks`` is a non-empty ModuleList whose first block has
    the anatomy's parts and ``b.embeddings`` exists; None if there is none."""
    blocks_at = anatomy.blocks
    candidates = [p for p, _ in model.named_modules() if name_matches(p, blocks_at)]
    for path in sorted(candidates, key=len):
        body: str = path[: -len(anatomy.blocks)].rstrip(".")
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        root = model.get_submodule(body) if body else model
        first = blocks[0]
        needed = [anatomy.attention_output, anatomy.ffn_output, *anatomy.ffn_input]
        needed += [p for p in (anatomy.query, anatomy.ffn) if p is not None]
        if _has(root, anatomy.embeddings) and all(_has(first, p) for p in needed):
            return body
    return None


def _config_value(config: Any, *names: str) -> int | None:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def find(model: nn.Module) -> Anatomy:
    """The known :class:`Anatomy` of ``model``: by ``config.model_type``, class name, then structure.

    Raises:
        ValueError: naming the model class when no known anatomy fits.
    """
    config = getattr(model, "config", None)
    for key in (getattr(config, "model_type", None), type(model).__name__):
        if isinstance(key, str) and key in KNOWN and _body(model, KNOWN[key]) is not None:
            return KNOWN[key]
    for anatomy in dict.fromkeys(KNOWN.values()):
        if _body(model, anatomy) is not None:
            return anatomy
    raise ValueError(
        f"deltatune.anatomy does not know where the blocks, attention and FFN of "
        f"{type(model).__name__} are (model_type={getattr(config, 'model_type', None)!r}); describe them "
        "with deltatune.anatomy.Anatomy(...) and register(<model_type or class name>, anatomy), "
        "or pass targets explicitly"
    )


def describe(model: nn.Module, anatomy: Anatomy | None = None) -> Parts:
    """Locate the parts of ``model`` (with ``anatomy``, or the known one found by :func:`find`).

    Raises:
        ValueError: the model is unknown, or ``anatomy``'s paths do not exist in it (the message
            names the model class and the missing path).
    """
    if anatomy is None:
        anatomy = find(model)
    elif not isinstance(anatomy, Anatomy):
        raise ValueError(f"anatomy must be a deltatune.anatomy.Anatomy, got {type(anatomy).__name__}")
    body = _body(model, anatomy)
    if body is None:
        missing = _first_missing(model, anatomy)
        raise ValueError(f"{type(model).__name__} does not fit the given Anatomy: {missing}")
    prefix = body + "." if body else ""
    blocks = model.get_submodule(prefix + anatomy.blocks)
    assert isinstance(blocks, nn.ModuleList)  # checked by _body
    embeddings = model.get_submodule(prefix + anatomy.embeddings)
    weight = getattr(embeddings, "weight", None)
    config = getattr(model, "config", None)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    if hidden is None and weight is not None:
        hidden = int(weight.shape[-1])
    if hidden is None:
        raise ValueError(
            f"{type(model).__name__}: cannot tell the hidden size (no config, no embedding weight)"
        )
    heads = _config_value(config, "num_attention_heads", "n_head") or anatomy.num_heads
    kv_heads = _config_value(config, "num_key_value_heads") or heads
    return Parts(
        anatomy=anatomy,
        body=body,
        embeddings=prefix + anatomy.embeddings,
        blocks=tuple(f"{prefix}{anatomy.blocks}.{i}" for i in range(len(blocks))),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
    )


def _first_missing(model: nn.Module, anatomy: Anatomy) -> str:
    lists = [p for p, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not any(name_matches(p, anatomy.blocks) for p in lists):
        return f"no ModuleList at Anatomy.blocks={anatomy.blocks!r} (ModuleLists: {lists[:6]})"
    for f in dataclasses.fields(anatomy):
        value = getattr(anatomy, f.name)
        if f.name in ("blocks", "num_heads") or value is None:
            continue
        for rel in value if isinstance(value, tuple) else (value,):
            if f.name == "embeddings":
                if not any(name_matches(p, rel) for p, _ in model.named_modules()):
                    return f"no module at Anatomy.embeddings={rel!r}"
            elif not any(p.endswith(f"{anatomy.blocks}.0.{rel}") for p, _ in model.named_modules()):
                return f"block 0 has no module at Anatomy.{f.name}={rel!r}"
    return "the embeddings and blocks are not under one common module"
