"""The training loop: any registered method (or full fine-tuning) on any task, one code path.

* AdamW with parameter groups (adapter, head, and any groups a method declares with
  ``parameter_groups``), warmup then linear or cosine decay, gradient accumulation, clipping,
  fp32 or bf16 autocast, seeds.
* A fixed data order: step ``s`` uses positions ``[s·G, (s+1)·G)`` of a stream of seeded
  permutations, G being the global batch. So a resumed run sees exactly the batches it would have
  seen, and under ``torchrun`` rank ``r`` of ``W`` takes the ``r``-th slice of each global batch.
* Losses are sums divided by the *global* count of examples (or target tokens), so the gradient of
  a W-process run (DDP averages) equals that of a 1-process run with the same global batch.
* Checkpoints (adapter tensors, optimizer state, RNG, step) in safetensors + JSON, written to a
  temporary folder and renamed: a killed run (SIGINT or worse) leaves the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..fields import to_jsonable
from ..io import normal_permissions, read_tensors, save
from ..targets import ALL_LINEAR, HEAD_NAMES, resolve
from .data import Example, Task, get_task, load_split
from .metrics import compute
from .progress import Progress

FULL = "full"  # pseudo-method: train every parameter
HEAD_ONLY = "head"  # pseudo-method: train only the task head (a linear probe)
CHECKPOINT_VERSION = 1
SCHEDULES = ("linear", "cosine", "constant")  # learning-rate decay after warmup
PRECISIONS = ("fp32", "bf16")
# Options that do not change what a run computes: a rerun into the same ``out`` may change them.
RUN_NEUTRAL = ("out", "resume", "checkpoint_every", "eval_batch_size")
# What a run writes under ``out`` (all of it is removed by ``train(..., overwrite=True)``).
RUN_FILES = ("metrics.json", "curves.png", "adapter", "trained.safetensors", "checkpoint", "checkpoint.old")

# Prompts for causal-LM tasks; the target follows after a space.
PROMPTS: dict[str, str] = {
    "e2e": "Describe the restaurant in one sentence.\nAttributes: {0}\nDescription:",
    "gsm8k": "Question: {0}\nAnswer:",
}

# Attention query/value projections by naming convention: LoRA's default targets (Hu et al. §7.1).
QUERY_VALUE = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q", "v"))


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved in every checkpoint and metrics file.

    ``method`` is a registered method name, ``"full"`` (full fine-tuning) or ``"head"`` (head only);
    ``method_fields`` are its fields (e.g. ``{"rank": 8, "alpha": 16}``). ``targets`` defaults to
    the attention query and value projections; ``modules_to_save`` to the task head for
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
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_every: int = 0
    eval_before: bool = False
    eval_batch_size: int = 64
    max_new_tokens: int = 64
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "fp32"
    out: str = "runs/run"
    data_dir: str | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"TrainConfig.head_lr must be > 0, got {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"TrainConfig.schedule must be linear, cosine or constant, got {self.schedule!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_grad_norm < 0:
            raise ValueError(
                f"TrainConfig.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}"
            )
        if self.method in (FULL, HEAD_ONLY) and self.method_fields:
            raise ValueError(f"TrainConfig.method_fields: method {self.method!r} takes no fields")
        if self.method not in (FULL, HEAD_ONLY):
            core.method_from_config(self.method, self.method_fields)  # unknown method/field -> ValueError
        # Plain JSON from here on (an initialiser object becomes {"type": ...}): checkpoints,
        # metrics.json and the comparison with a run already in ``out`` all see the same values.
        self.method_fields = {k: to_jsonable(v) for k, v in self.method_fields.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- distributed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _all_reduce_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# -- batches -----------------------------------------------------------------------------------


def batch_positions(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: consecutive slices of seeded per-epoch permutations."""
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def prompt_of(task: Task, example: Example) -> str:
    template = PROMPTS.get(task.name)
    if template is None:
        return "\n".join(example.texts) + "\n"
    return template.format(*example.texts)


class Collator:
    """Turns examples into model inputs, labels and the count the loss is divided by."""

    def __init__(self, task: Task, tokenizer: Any, max_length: int) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.task.kind == "generation":
            return self._causal(examples)
        texts = list(zip(*[e.texts for e in examples], strict=True))
        enc = self.tokenizer(
            *[list(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        dtype = torch.float32 if self.task.kind == "regression" else torch.long
        enc["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
        return dict(enc)

    def _causal(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        for e in examples:
            prompt = tok(prompt_of(self.task, e), add_special_tokens=False)["input_ids"]
            target = tok(" " + (e.target or ""), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            # Too long: drop the start of the prompt, never the whole target (the loss would be empty).
            target = target[: self.max_length - 1]
            prompt = prompt[max(0, len(prompt) + len(target) - self.max_length) :]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            lab[i, : len(lb)] = torch.tensor(lb)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}


def count_of(batch: dict[str, torch.Tensor], kind: str) -> int:
    """What the loss of this batch is a sum over: examples, or predicted target tokens."""
    if kind == "generation":
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["labels"].shape[0])


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Forward ``batch`` and return its summed loss."""
    return loss_of_logits(logits_of(model, batch), batch["labels"], kind)


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits: torch.Tensor = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits


def loss_of_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed loss (the caller divides by the global count, see the module docstring)."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if kind == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels, reduction="sum")
    shift = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")


# -- model and optimizer -----------------------------------------------------------------------


def head_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children() if name in HEAD_NAMES and name != "lm_head"]


def default_targets(model: nn.Module) -> list[str]:
    leaves = {p.split(".")[-1] for p, _ in model.named_modules()}
    for names in QUERY_VALUE:
        if all(n in leaves for n in names):
            return list(names)
    return [ALL_LINEAR]


def prepare(model: nn.Module, cfg: TrainConfig, task: Task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Apply the method; return optimizer parameter groups and facts for the report."""
    heads = head_paths(model) if task.kind != "generation" else []
    if cfg.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        head = [p for p in model.parameters() if id(p) in head_ids]
        groups = [{"params": body, "lr": cfg.lr, "name": "body"}]
        if head:
            groups.append({"params": head, "lr": cfg.head_lr or cfg.lr, "name": "head"})
        return groups, {"trainable": sum(p.numel() for p in model.parameters())}
    if cfg.method == HEAD_ONLY:
        for p in model.parameters():
            p.requires_grad_(False)
        if not heads:
            raise ValueError(f"method 'head': model {cfg.model!r} has no task head (looked for {HEAD_NAMES})")
        head = [p for h in heads for p in model.get_submodule(h).parameters()]
        for p in head:
            p.requires_grad_(True)
        return [{"params": head, "lr": cfg.head_lr or cfg.lr, "name": "head"}], {
            "trainable": sum(p.numel() for p in head)
        }
    method = core.method_from_config(cfg.method, cfg.method_fields)
    # A method that knows where it goes (adapters after attention/FFN outputs, ...) says so.
    declared = getattr(method, "default_targets", None)
    targets = cfg.targets or (declared(model) if declared is not None else default_targets(model))
    # A method may fit the fields the user left at their defaults to this model (core.Method).
    fit_to = getattr(method, "fit_to", None)
    fitted: dict[str, Any] = {}
    if fit_to is not None:
        chosen = fit_to({p: model.get_submodule(p) for p in resolve(model, targets)}, set(cfg.method_fields))
        before = core.method_fields(method)
        fitted = {k: v for k, v in core.method_fields(chosen).items() if v != before[k]}
        method = chosen
    saved = cfg.modules_to_save if cfg.modules_to_save is not None else heads
    att = core.inject(model, method, targets=targets, modules_to_save=saved, seed=cfg.seed)
    info = att.info("default")
    copy_ids = {id(p) for path in info.modules_to_save for p in att.layers("default")[path].parameters()}
    declared = getattr(method, "parameter_groups", None)
    adapter = [p for p in info.trainable if id(p) not in copy_ids]
    groups = []
    if declared is not None:
        # A method may split its parameters into groups with their own learning-rate multipliers.
        for name, (params, scale) in declared(att, "default").items():
            groups.append({"params": params, "lr": cfg.lr * scale, "name": name})
    else:
        groups.append({"params": adapter, "lr": cfg.lr, "name": "adapter"})
    head = [p for p in info.trainable if id(p) in copy_ids]
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr, "name": "head"})
    facts = {"trainable": sum(p.numel() for p in info.trainable), "targets": list(info.targets)}
    return groups, {**facts, "fitted": fitted}


def lr_lambda(cfg: TrainConfig) -> Any:
    warmup = int(cfg.warmup_ratio * cfg.steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


# -- checkpoints -------------------------------------------------------------------------------


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    """The options a checkpoint must agree with to be resumed."""
    keys = (
        "model",
        "task",
        "method",
        "method_fields",
        "targets",
        "modules_to_save",
        "batch_size",
        "grad_accum",
        "seed",
        "train_limit",
    )
    return {k: getattr(cfg, k) for k in keys}


def save_checkpoint(
    folder: Path,
    step: int,
    cfg: TrainConfig,
    params: list[nn.Parameter],
    names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "step": step,
        "identity": _identity(cfg),
        "config": cfg.to_dict(),
        "param_names": names,
        "param_shapes": [list(p.shape) for p in params],
        "optimizer_groups": groups,
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "history": history,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        normal_permissions(tmp)  # mkdtemp's 0o700, safetensors' 0o600
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_checkpoint(
    folder: Path,
    cfg: TrainConfig,
    params: list[nn.Parameter],
    names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint; refuse one from another model, task, method or data order."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        old = folder.with_name(folder.name + ".old")
        if old.is_dir() and (old / "state.json").is_file():  # killed between the two renames
            folder = old
            state_path = folder / "state.json"
        else:
            raise ValueError(f"{folder}: no state.json; not a deltatune checkpoint")
    state = json.loads(state_path.read_text())
    if state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{folder}: checkpoint_version {state.get('checkpoint_version')} is not supported")
    mine = _identity(cfg)
    theirs = state["identity"]
    diff = [
        f"{k}: checkpoint {theirs.get(k)!r}, this run {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]
    ]
    if diff:
        raise ValueError(
            f"{folder} is a checkpoint of a different run ({'; '.join(diff)}); "
            "use another --out, or --overwrite to start over"
        )
    if state["param_names"] != names or state["param_shapes"] != [list(p.shape) for p in params]:
        raise ValueError(
            f"{folder}: the checkpoint's parameters do not match this model's trainable parameters"
        )
    tensors = read_tensors(folder / "state.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    opt_state: dict[str, Any] = {"state": {}, "param_groups": []}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    for idx, scalars in state["optimizer_scalars"].items():
        opt_state["state"].setdefault(int(idx), {}).update(scalars)
    current = optimizer.state_dict()["param_groups"]
    opt_state["param_groups"] = [
        {**g, "params": c["params"]} for g, c in zip(state["optimizer_groups"], current, strict=True)
    ]
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"]), dict(state["history"])


def saved_configs(out: Path) -> dict[str, dict[str, Any]]:
    """The configs of the run already in ``out``: its metrics.json and its checkpoint, where present.

    A checkpoint from before configs were stored in it gives its identity (the options it pins).
    """
    found: dict[str, dict[str, Any]] = {}
    metrics = out / "metrics.json"
    if metrics.is_file():
        found[str(metrics)] = json.loads(metrics.read_text()).get("config", {})
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        state = folder / "state.json"
        if state.is_file():
            data = json.loads(state.read_text())
            found[str(state)] = data.get("config") or data.get("identity", {})
            break
    return found


def check_out_folder(cfg: TrainConfig) -> None:
    """Refuse to write into an ``out`` that holds a run of another config (``ValueError``).

    Options in :data:`RUN_NEUTRAL` may differ (a rerun that only checkpoints more often resumes).
    """
    out = Path(cfg.out)
    mine = json.loads(json.dumps(cfg.to_dict()))
    for where, theirs in saved_configs(out).items():
        diff = [
            f"{k}: there {theirs[k]!r}, this run {mine[k]!r}"
            for k in mine
            if k not in RUN_NEUTRAL and k in theirs and theirs[k] != mine[k]
        ]
        if diff:
            raise ValueError(
                f"{out} holds a different run ({'; '.join(diff)}; read from {where}); use another "
                "--out, or --overwrite (overwrite=True in Python) to replace it"
            )


def remove_run(out: Path) -> None:
    """Delete what a run wrote under ``out`` (nothing else in the folder)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for tmp in out.glob(".checkpoint.*"):  # left by a run killed while writing a checkpoint
        shutil.rmtree(tmp, ignore_errors=True)


# -- evaluation --------------------------------------------------------------------------------


def _batches(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    cfg: TrainConfig,
    progress: bool = True,
) -> dict[str, float]:
    """The task's metrics (and the mean loss) on ``examples``."""
    was_training = model.training
    model.eval()
    collate = Collator(task, tokenizer, cfg.max_length)
    total = count = 0.0
    predictions: list[Any] = []
    bar = Progress(len(examples), "eval", unit="example", enabled=progress, leave=False)
    for chunk in _batches(examples, cfg.eval_batch_size):
        batch = _to(collate(chunk), _device(model))
        with _autocast(cfg):
            logits = logits_of(model, batch)  # one forward serves the loss and the predictions
        total += float(loss_of_logits(logits, batch["labels"], task.kind))
        count += count_of(batch, task.kind)
        if task.kind != "generation":
            logits = logits.float()
            predictions.extend(
                logits.argmax(-1).tolist() if task.kind == "classification" else logits[:, 0].tolist()
            )
        else:
            predictions.extend(generate(model, tokenizer, task, chunk, cfg))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    metrics = {"loss": total / max(count, 1)}
    metrics.update(compute(task, predictions, list(examples)))
    return metrics


def generate(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], cfg: TrainConfig
) -> list[str]:
    """Greedy continuations of the prompts (left-padded so that generation continues each one)."""
    prompts = [prompt_of(task, e) for e in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = _to(
            tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False), _device(model)
        )
    finally:
        tokenizer.padding_side = side
    target: Any = model.module if hasattr(model, "module") else model
    out = target.generate(
        **enc,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts: list[str] = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip().split("\n")[0] if task.name == "e2e" else t.strip() for t in texts]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(cfg: TrainConfig) -> Any:
    if cfg.precision == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- the run -----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[Callable[[int, float], None]] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``cfg``; write the adapter, ``metrics.json`` and ``curves.png`` under ``cfg.out``.

    If ``cfg.out`` holds a run of the same config (the options in :data:`RUN_NEUTRAL` aside), it is
    resumed from its checkpoint (``cfg.resume``); a run of another config is refused, unless
    ``overwrite``, which deletes the run's files there and starts over.

    ``progress``: a bar on a terminal, a plain line every few seconds otherwise (see
    :mod:`deltatune.train.progress`).

    Returns:
        The metrics record that is also written to ``metrics.json``.
    """
    from .models import load_model

    world = init_world()
    task = get_task(cfg.task)
    out = Path(cfg.out)
    if not overwrite:
        check_out_folder(cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_examples = load_split(
        task, "train", cfg.data_dir, limit=cfg.train_limit, seed=cfg.seed if cfg.train_limit else None
    )
    eval_examples = load_split(
        task, "eval", cfg.data_dir, limit=cfg.eval_limit, seed=cfg.seed if cfg.eval_limit else None
    )
    global_batch = cfg.batch_size * cfg.grad_accum
    if cfg.batch_size % world.size:
        raise ValueError(
            f"TrainConfig.batch_size {cfg.batch_size} must be divisible by the {world.size} processes"
        )
    # The adapter records cfg.model as its base only when the harness loaded it; a model passed in
    # is recorded by what it says of itself (deltatune.io.base_model_of).
    base_model = cfg.model if model is None else None
    if model is None:
        model, tokenizer = load_model(cfg.model, task.kind, task.num_labels or None, seed=cfg.seed)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    assert tokenizer is not None
    groups, facts = prepare(model, cfg, task)
    if facts.get("fitted") and world.main:
        chosen = ", ".join(f"{k}={v}" for k, v in facts["fitted"].items())
        print(f"{cfg.method}: {chosen} chosen to fit {cfg.model} (set it to override)", file=sys.stderr)
    if overwrite and world.main:
        remove_run(out)
    model.train()
    trainable = [p for g in groups for p in g["params"]]
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(trainable)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    runner: nn.Module = model
    if world.size > 1:
        device = _device(model)
        runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    history: dict[str, Any] = {"loss": [], "eval": []}
    step = 0
    ckpt = out / "checkpoint"
    if cfg.resume and not overwrite and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        step, history = load_checkpoint(ckpt, cfg, trainable, names, optimizer, scheduler)
    collate = Collator(task, tokenizer, cfg.max_length)
    per_rank = cfg.batch_size // world.size
    if cfg.eval_before and step == 0 and world.main:
        history["before"] = evaluate(model, tokenizer, task, eval_examples, cfg, progress)
        history["eval"].append([0, history["before"]])
        model.train()
    metrics_before: dict[str, float] | None = history.get("before")
    bar = Progress(
        cfg.steps, f"{cfg.method} {task.name}", unit="step", initial=step, enabled=progress and world.main
    )
    train_seconds = 0.0
    while step < cfg.steps:
        t0 = time.perf_counter()
        positions = batch_positions(step, global_batch, len(train_examples), cfg.seed)
        micro = []
        for m in range(cfg.grad_accum):
            chunk = positions[m * cfg.batch_size : (m + 1) * cfg.batch_size]
            mine = chunk[world.rank * per_rank : (world.rank + 1) * per_rank]
            micro.append(_to(collate([train_examples[i] for i in mine]), _device(model)))
        denominator = _all_reduce_sum(float(sum(count_of(b, task.kind) for b in micro)), world)
        step_loss = 0.0
        for m, batch in enumerate(micro):
            last = m == len(micro) - 1
            sync = runner.no_sync() if (world.size > 1 and not last) else nullcontext()  # type: ignore[operator]
            try:
                with sync, _autocast(cfg):
                    loss = loss_sum(runner, batch, task.kind) * (world.size / denominator)
                    loss.backward()
            except RuntimeError as e:
                if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                    raise ValueError(
                        f"a batch of {per_rank} examples does not fit in memory on {_device(model)}; lower "
                        f"--batch-size and raise --grad-accum to keep the global batch ({global_batch})"
                    ) from e
                raise
            step_loss += float(loss.detach()) / world.size
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = _all_reduce_sum(step_loss, world)
        history["loss"].append([step, step_loss])
        train_seconds += time.perf_counter() - t0
        bar.update(1, loss=f"{step_loss:.4f}")
        for callback in callbacks:
            callback(step, step_loss)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and world.main:
            history["eval"].append([step, evaluate(model, tokenizer, task, eval_examples, cfg, progress)])
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and world.main:
            history["train_seconds"] = history.get("train_seconds", 0.0) + train_seconds
            train_seconds = 0.0
            save_checkpoint(ckpt, step, cfg, trainable, names, optimizer, scheduler, history)
    bar.close()
    history["train_seconds"] = history.get("train_seconds", 0.0) + train_seconds
    record: dict[str, Any] = {}
    if world.main:
        final = evaluate(model, tokenizer, task, eval_examples, cfg, progress)
        history["eval"].append([step, final])
        stored_bytes = _store(model, cfg, task, out, base_model)
        record = {
            "config": cfg.to_dict(),
            "task": task.name,
            "main_metric": task.main_metric,
            "metrics": final,
            "before": metrics_before,
            "trainable_parameters": facts["trainable"],
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "stored_bytes": stored_bytes,
            "train_seconds": round(history["train_seconds"], 2),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "peak_memory_bytes": peak_memory_bytes(),
            "world_size": world.size,
            "history": history,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(record, indent=1))
        try:
            from .plot import plot_curves

            plot_curves(record, out / "curves.png")
        except ImportError:
            pass
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    return record


def task_record(cfg: TrainConfig, task: Task) -> dict[str, Any]:
    """What an adapter records of its run (``adapter_config.json``'s ``task``, see
    :data:`deltatune.io.TASK_FIELDS`): enough for ``deltatune eval ADAPTER`` to evaluate it on the
    same examples, the same way."""
    record: dict[str, Any] = {
        "name": task.name,
        "max_length": cfg.max_length,
        "eval_limit": cfg.eval_limit,
        "eval_seed": cfg.seed,  # load_split shuffles with it only when there is a limit
    }
    if task.kind == "generation":
        record["max_new_tokens"] = cfg.max_new_tokens
    return record


def _store(model: nn.Module, cfg: TrainConfig, task: Task, out: Path, base_model: str | None) -> int:
    """Save what the run produced; return its size in bytes (tensor data)."""
    if core.has_adapters(model):
        save(model, out / "adapter", base_model=base_model, task=task_record(cfg, task))
        return core.parameter_report(model).stored_bytes
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "trained.safetensors"))
    normal_permissions(out / "trained.safetensors")  # safetensors >= 0.8 writes it 0o600
    return sum(t.numel() * t.element_size() for t in tensors.values())
