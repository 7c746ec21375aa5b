"""Checkpoints of a run, and what a run may do to the ``out`` folder it is given.

A checkpoint (adapter tensors, optimizer state, scheduler, RNG, step, history) is safetensors + JSON,
written to a temporary folder and renamed: a killed run (SIGINT or worse) leaves the last complete
checkpoint. It is resumed only by a run with the same :func:`identity`; an ``out`` that holds a run
of another config is refused (:func:`check_out_folder`) unless the caller overwrites it
(:func:`remove_run`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats import tensorfile
from ..formats.files import write_folder
from ..formats.io import read_files
from ..runtime.stepping import load_step_state, step_state
from .config import RUN_NEUTRAL, TrainConfig

__all__ = [
    "CHECKPOINT_VERSION",
    "RUN_FILES",
    "check_out_folder",
    "checkpoint_step",
    "has_checkpoint",
    "identity",
    "load_checkpoint",
    "remove_run",
    "save_checkpoint",
    "saved_configs",
]

CHECKPOINT_VERSION = 1
# What a run writes under ``out`` (all of it is removed by ``train(..., overwrite=True)``).
RUN_FILES = ("metrics.json", "curves.png", "adapter", "trained.safetensors", "checkpoint", "checkpoint.old")


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """The options a checkpoint must agree with to be resumed (the model, the method and the data order)."""
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
    *,
    model: nn.Module | None = None,
) -> None:
    """Write ``folder`` (``state.safetensors`` + ``state.json``) atomically, through
    :func:`deltatune.formats.files.write_folder`: ``folder`` holds the previous checkpoint or the new one.

    With ``model``, the between-step state of its adapters (:func:`deltatune.runtime.stepping.step_state`:
    AdaLoRA's importance averages, ReLoRA's folded updates, ...) is saved too."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    if model is not None:
        for key, value in step_state(model).items():
            tensors[f"step.{key}"] = value.detach().cpu().contiguous()
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
        "identity": identity(cfg),
        "config": cfg.to_dict(),
        "param_names": names,
        "param_shapes": [list(p.shape) for p in params],
        "optimizer_groups": groups,
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "history": history,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))

    write_folder(folder, write)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` (or the ``<folder>.old`` a run killed between two renames leaves) exists."""
    return folder.exists() or folder.with_name(folder.name + ".old").exists()


def checkpoint_step(folder: Path) -> int | None:
    """The step the checkpoint in ``folder`` was written at (None: none there, or unreadable)."""
    for each in (folder, folder.with_name(folder.name + ".old")):
        try:
            return int(json.loads((each / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def load_checkpoint(
    folder: Path,
    cfg: TrainConfig,
    params: list[nn.Parameter],
    names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    model: nn.Module | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into ``params``, ``optimizer`` and ``scheduler`` (and the torch RNG, and
    with ``model`` its adapters' between-step state); return the step it was written at and the
    run's history so far.

    Raises:
        ValueError: no checkpoint in ``folder``, an unsupported version, or one from another model,
            task, method or data order (the message lists what differs), or other parameters.
    """
    if not (folder / "state.json").is_file():
        old = folder.with_name(folder.name + ".old")
        if old.is_dir() and (old / "state.json").is_file():  # killed between the two renames
            folder = old
        else:
            raise ValueError(f"{folder}: no state.json; not a deltatune checkpoint")
    # Both files of one checkpoint, even while the run writes the next one (files.read_folder).
    found = read_files(folder, ["state.json", "state.safetensors"], "deltatune checkpoint")
    if found["state.safetensors"] is None:
        raise ValueError(f"{folder / 'state.safetensors'} does not exist")
    state = json.loads(found["state.json"])
    if state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{folder}: checkpoint_version {state.get('checkpoint_version')} is not supported")
    mine = identity(cfg)
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
    tensors = tensorfile.tensors(found["state.safetensors"], folder / "state.safetensors")
    if model is not None:
        step_tensors = {k[len("step.") :]: v for k, v in tensors.items() if k.startswith("step.")}
        try:
            load_step_state(model, step_tensors)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
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
    for name in RUN_FILES:  # the temporary siblings a run killed while writing leaves
        stem, suffix = Path(name).stem, Path(name).suffix
        for tmp in out.glob(f".{stem}.*{suffix}" if suffix else f".{name}.*"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
