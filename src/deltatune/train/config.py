"""What defines a training run: :class:`TrainConfig`, checked when it is built.

A config is plain data (JSON-able once built): it is saved in every checkpoint and ``metrics.json``,
and a rerun into the same ``out`` is compared with it (:mod:`deltatune.train.checkpoint`).

Example:
    >>> cfg = TrainConfig.from_dict({"task": "rte", "method": "lora", "method_fields": {"rank": 4}})
    >>> cfg.method_fields, cfg.targets
    ({'rank': 4}, None)
    >>> TrainConfig(schedule="step")
    Traceback (most recent call last):
    ...
    ValueError: TrainConfig.schedule must be linear, cosine or constant, got 'step'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..contract.fields import to_jsonable
from ..kernels.lowrank import PRECISIONS as ADAPTER_PRECISIONS
from ..runtime.quant import FORMATS  # in which dtype adapters compute

__all__ = [
    "ADAPTER_PRECISIONS",
    "FULL",
    "HARNESS_LR",
    "HEAD_LR",
    "HEAD_ONLY",
    "LORAPLUS_LR",
    "PRECISIONS",
    "QUANTIZE",
    "REPORTERS",
    "RUN_NEUTRAL",
    "SCHEDULES",
    "TrainConfig",
    "default_lr",
]

FULL = "full"  # pseudo-method: train every parameter
HEAD_ONLY = "head"  # pseudo-method: train only the task head (a linear probe)
SCHEDULES = ("linear", "cosine", "constant")  # learning-rate decay after warmup
PRECISIONS = ("fp32", "bf16")
# Options that do not change what a run computes: a rerun into the same ``out`` may change them.
RUN_NEUTRAL = ("out", "resume", "checkpoint_every", "eval_batch_size", "eval_generate", "report_to")
REPORTERS = ("tensorboard", "mlflow")
#: 4-bit frozen bases (deltatune.runtime.quant): QLoRA, and QPiSSA with a weight-derived init.
QUANTIZE = FORMATS
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer computes in float32: a larger rate cannot be applied
#: The rates of the harness's own methods, which have no class to declare one (a registered method
#: declares its own: :meth:`deltatune.contract.Method.default_lr`). Chosen like theirs, on SST-2's
#: validation split (benchmarks/README.md, "Each method at its own learning rate").
#: Full fine-tuning: 84.0 at 1.5e-4 (5e-5: 83.1; 1.7e-5: 81.7). The linear probe (a lone head on frozen
#: features learns slowly): 73.0 at 9e-2 (3e-2: 72.8; 1e-2: 71.5; at 1e-3 it stays at the majority class).
HARNESS_LR = {FULL: 1.5e-4, HEAD_ONLY: 9e-2}
#: A's rate under LoRA+ (``loraplus_ratio``) where ``lr`` is not given, B's being the ratio times it:
#: the grid chose 1e-3 at ratio 16 (82.2 on SST-2's validation split; 3e-3 gave 73.3).
LORAPLUS_LR = 1e-3
#: The rate of a classification or regression head (new, trained in full beside the method) where
#: ``head_lr`` is not given; the linear probe's head trains at ``lr``.
HEAD_LR = 1e-3


def default_lr(method: str, fields: dict[str, Any] | None = None) -> float:
    """The learning rate a run of ``method`` (with ``fields``) gets when ``lr`` is not given: the
    method's own (:meth:`deltatune.contract.Method.default_lr`), or :data:`HARNESS_LR`'s."""
    if method in HARNESS_LR:
        return HARNESS_LR[method]
    return contract.method_from_config(method, fields or {}).default_lr()


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved in every checkpoint and metrics file.

    ``method`` is a registered method name, ``"full"`` (full fine-tuning) or ``"head"`` (head only);
    ``method_fields`` are its fields (e.g. ``{"rank": 8, "alpha": 16}``). ``targets`` defaults to
    :func:`deltatune.train.prepare.harness_targets`; ``modules_to_save`` to the task head for
    classification and regression.
    """

    model: str = "minilm"
    task: str = "sst2"
    method: str = "lora"
    method_fields: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None
    modules_to_save: list[str] | None = None
    steps: int = 150
    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None
    head_lr: float | None = None
    loraplus_ratio: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    validation: int = 0
    eval_every: int = 0
    eval_before: bool = False
    eval_batch_size: int = 64
    max_new_tokens: int = 64
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "fp32"
    fsdp: bool = False
    compile: bool = False
    activation_checkpointing: bool = False
    adapter_precision: str = "input"
    out: str = "runs/run"
    data_dir: str | None = None
    resume: bool = True
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.05
    data_format: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    loss_on: str = "assistant"
    chat_template: str | None = None
    eval_generate: int = 0
    group_by_length: bool = True
    report_to: list[str] | None = None
    streaming: bool = False
    quantize: str | None = None
    add_tokens: list[str] | None = None
    trainable_tokens: list[str] | None = None
    quantize_iterations: int = 1

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.validation, bool) or not isinstance(self.validation, int) or self.validation < 0:
            raise ValueError(
                f"TrainConfig.validation must be an integer >= 0 (examples held out; 0 = none), got "
                f"{self.validation!r}"
            )
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= FLOAT32_MAX:
                raise ValueError(
                    f"TrainConfig.{name} must be a number > 0 that float32 holds (at most 3.4e38), "
                    f"got {value}"
                )
        if self.loraplus_ratio is not None:
            ratio = self.loraplus_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
                raise ValueError(
                    "TrainConfig.loraplus_ratio (LoRA+: B's learning rate / A's) must be a finite "
                    f"number > 0, got {ratio!r}"
                )
            if self.method in (FULL, HEAD_ONLY):
                raise ValueError(
                    f"TrainConfig.loraplus_ratio: method {self.method!r} has no low-rank factors; "
                    "LoRA+ needs an adapter with lora_B factors (lora, dora, lora_fa, ...)"
                )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"TrainConfig.schedule must be linear, cosine or constant, got {self.schedule!r}"
            )
        if self.adapter_precision not in ADAPTER_PRECISIONS:
            raise ValueError(
                f"TrainConfig.adapter_precision must be input or adapter, got {self.adapter_precision!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_grad_norm < 0:
            raise ValueError(
                f"TrainConfig.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}"
            )
        for name in ("fsdp", "compile", "activation_checkpointing", "streaming", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.fsdp and self.checkpoint_every:
            raise ValueError(
                "TrainConfig.checkpoint_every: a sharded run (fsdp) writes no periodic checkpoints yet; "
                "pass --checkpoint-every 0 (the adapter is still saved at the end)"
            )
        self._check_data()
        self._check_quantize()
        if self.method in (FULL, HEAD_ONLY) and self.method_fields:
            raise ValueError(f"TrainConfig.method_fields: method {self.method!r} takes no fields")
        if self.method not in (FULL, HEAD_ONLY):
            contract.method_from_config(self.method, self.method_fields)  # unknown method/field -> ValueError
        if self.lr is None:  # the method's own rate (recorded: metrics.json says what ran)
            own = default_lr(self.method, self.method_fields)
            self.lr = LORAPLUS_LR if self.loraplus_ratio is not None else own
        if self.validation and self.streaming:
            raise ValueError(
                "TrainConfig.validation holds examples out of the training data, which --streaming reads "
                "once, in order; drop --validation or --streaming"
            )
        # Plain JSON from here on (an initialiser object becomes {"type": ...}): checkpoints,
        # metrics.json and the comparison with a run already in ``out`` all see the same values.
        self.method_fields = {k: to_jsonable(v) for k, v in self.method_fields.items()}

    def _check_quantize(self) -> None:
        """A 4-bit base (``quantize``) and QPiSSA's refits (``quantize_iterations``)."""
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(
                f"TrainConfig.quantize must be {' or '.join(QUANTIZE)} (or unset: the base as it loads), "
                f"got {self.quantize!r}"
            )
        rounds = self.quantize_iterations
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"TrainConfig.quantize_iterations must be an integer >= 1, got {rounds!r}")
        if rounds > 1 and self.quantize is None:
            raise ValueError(
                "TrainConfig.quantize_iterations refits a weight-derived initialisation to a 4-bit base "
                "(QPiSSA); give quantize (--quantize nf4) or drop it"
            )
        if self.quantize is not None and self.method == FULL:
            raise ValueError(
                "TrainConfig.quantize: full fine-tuning trains every weight, which a 4-bit base freezes; "
                "use an adapter (--method lora: QLoRA) or drop --quantize"
            )

    def _check_data(self) -> None:
        """The options of a run on the user's data (``data`` and what goes with it)."""
        from .formats import DATA_FORMATS, LOSS_ON

        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ValueError(
                f"TrainConfig.data_format must be one of {', '.join(DATA_FORMATS)} (or unset: detected from "
                f"the columns), got {self.data_format!r}"
            )
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"TrainConfig.loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"TrainConfig.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if (
            isinstance(self.eval_generate, bool)
            or not isinstance(self.eval_generate, int)
            or self.eval_generate < 0
        ):
            raise ValueError(f"TrainConfig.eval_generate must be an integer >= 0, got {self.eval_generate!r}")
        unknown = [r for r in self.report_to or () if r not in REPORTERS]
        if unknown:
            raise ValueError(f"TrainConfig.report_to: unknown {unknown}; use {' or '.join(REPORTERS)}")
        if self.data is None:
            given = [
                name
                for name in ("eval_data", "data_format", "chat_template", "text_pair_column")
                if getattr(self, name) is not None
            ]
            if self.eval_generate and self.task not in ("e2e", "gsm8k"):
                given.append("eval_generate")
            if given:
                raise ValueError(
                    f"TrainConfig.{given[0]} applies to a run on your own data; give data (--data PATH) "
                    f"or drop {', '.join(given)}"
                )
        if self.streaming and (self.data is None or self.eval_data is None):
            raise ValueError(
                "TrainConfig.streaming reads --data while training; it needs data and eval_data (a held-out "
                "part of a stream would take a pass over it first)"
            )
        for name in ("add_tokens", "trainable_tokens"):
            tokens = getattr(self, name)
            if tokens is not None and (
                not isinstance(tokens, list)
                or not tokens
                or any(not isinstance(t, str) or not t for t in tokens)
                or len(set(tokens)) != len(tokens)
            ):
                raise ValueError(
                    f"TrainConfig.{name} must be a list of distinct non-empty tokens, got {tokens!r}"
                )
        if self.trainable_tokens is not None and self.method != "trainable_tokens":
            raise ValueError(
                "TrainConfig.trainable_tokens names the tokens of --method trainable_tokens (it trains their "
                f"rows); with --method {self.method}, train them as a second adapter through the API "
                "(deltatune.TrainableTokens beside it, both active)"
            )
        if (
            self.method == "trainable_tokens"
            and "token_ids" not in self.method_fields
            and not (self.trainable_tokens or self.add_tokens)
        ):
            raise ValueError(
                "--method trainable_tokens needs the tokens whose rows train: --add-tokens TOKEN ... (new "
                "special tokens, trained by default), --trainable-tokens TOKEN ..., or --token-ids ID ..."
            )
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(
                f"TrainConfig.chat_template: no such file {self.chat_template} (a Jinja template file)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from a mapping of option -> value; an unknown option is a ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def peak_lr(self) -> float:
        """``lr`` as it runs (``__post_init__`` sets the method's own where none was given)."""
        if self.lr is None:  # (a field assigned None after construction)
            raise ValueError("TrainConfig.lr is None; build the config again or give lr")
        return self.lr

    @property
    def head_rate(self) -> float:
        """The task head's learning rate: ``head_lr``, else ``lr`` for the linear probe (its head is
        all it trains) and :data:`HEAD_LR` beside any other method."""
        if self.head_lr is not None:
            return self.head_lr
        return self.peak_lr if self.method == HEAD_ONLY else HEAD_LR
