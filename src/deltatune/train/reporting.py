"""Run records beside ``metrics.json``: TensorBoard and MLflow, through the libraries' own writers.

``deltatune train --report-to tensorboard`` writes event files under ``OUT/tensorboard`` (view them
with ``tensorboard --logdir OUT/tensorboard``); ``--report-to mlflow`` logs to the MLflow tracking
URI the environment sets (``MLFLOW_TRACKING_URI``; by default ``./mlruns``): the config as
parameters, the training loss and learning rate per step, the evaluation metrics, and
``metrics.json`` as an artifact. Both are optional extras (``pip install tensorboard`` / ``mlflow``);
asking for one that is not installed is an error before training starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import TrainConfig

__all__ = ["Reporter", "open_reporters"]


class Reporter(Protocol):
    """Where a run's numbers go besides ``metrics.json``."""

    def log(self, step: int, values: dict[str, Any], prefix: str) -> None: ...

    def close(self, record: dict[str, Any] | None = None) -> None: ...


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in (values or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoard:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` under ``OUT/tensorboard``."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
            ) from e
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```")

    def log(self, step: int, values: dict[str, Any], prefix: str) -> None:
        for k, v in _numbers(values).items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self, record: dict[str, Any] | None = None) -> None:
        self.writer.flush()
        self.writer.close()


class MLflow:
    """A run of the active MLflow experiment: parameters, metrics per step, ``metrics.json``."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise ValueError("--report-to mlflow needs the mlflow package: pip install mlflow") from e
        self.mlflow = mlflow
        self.out = out
        mlflow.start_run(run_name=out.name)
        params = {
            k: json.dumps(v) if not isinstance(v, (str, int, float)) else v for k, v in cfg.to_dict().items()
        }
        mlflow.log_params(params)

    def log(self, step: int, values: dict[str, Any], prefix: str) -> None:
        self.mlflow.log_metrics({f"{prefix}/{k}": v for k, v in _numbers(values).items()}, step=step)

    def close(self, record: dict[str, Any] | None = None) -> None:
        if (self.out / "metrics.json").is_file():
            self.mlflow.log_artifact(str(self.out / "metrics.json"))
        self.mlflow.end_run()


class _All:
    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def log(self, step: int, values: dict[str, Any], prefix: str) -> None:
        for r in self.reporters:
            r.log(step, values, prefix)

    def close(self, record: dict[str, Any] | None = None) -> None:
        for r in self.reporters:
            r.close(record)


def open_reporters(cfg: TrainConfig, out: Path) -> Reporter | None:
    """The reporters ``cfg.report_to`` asks for (None if none)."""
    kinds: dict[str, Callable[[Path, TrainConfig], Reporter]] = {"tensorboard": TensorBoard, "mlflow": MLflow}
    chosen: list[Reporter] = [kinds[name](out, cfg) for name in dict.fromkeys(cfg.report_to or ())]
    return _All(chosen) if chosen else None
