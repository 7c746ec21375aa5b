"""Write one small adapter per registered method (and variant) with the deltatune on sys.path, for
tests/test_legacy_adapters.py: adapters saved by an older deltatune must keep loading, with the same
outputs.

    PYTHONPATH=src:tests python tests/data/legacy/make.py tests/data/legacy/format-3

(for an older release: ``git worktree add /tmp/old <commit>`` and run this file with
``PYTHONPATH=/tmp/old/src:/tmp/old/tests``). Each case folder holds the adapter files as that version
saved them, plus ``reference.safetensors`` (the toy's base weights, an input ``x`` and the output
``y`` of the adapted model) and ``case.json`` (which toy). The NF4 toy is left out (its base weights
are not plain tensors) and so are variants that need calibration files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import deltatune as dt
from deltatune.contract import REGISTRY
from deltatune.contract.fields import from_jsonable
from deltatune.targets import module_kind, resolve
from toy_models import TOYS


def cases() -> list[tuple[str, type, dict]]:
    out = []
    for name, cls in sorted(REGISTRY.items()):
        out.append((name, cls, dict(cls.suite.example)))
        for label, spec in cls.suite.variants.items():
            if spec.get("calibration"):
                continue
            fields = {k: from_jsonable(v, k) for k, v in spec["fields"].items()}
            layer_types = spec.get("layer_types")
            out.append((f"{name}[{label}]", cls if layer_types is None else _with(cls, layer_types), fields))
    return out


def _with(cls: type, layer_types: tuple) -> type:
    return type(cls.__name__, (), {"layer_types": tuple(layer_types), "model_level": False, "cls": cls})


def targets(cls: type, method: object, model: torch.nn.Module) -> list[str]:
    declared = getattr(method, "default_targets", None)
    try:
        spec = declared(model) if declared is not None else None
        if spec is not None:
            return resolve(model, spec)
    except ValueError:
        pass
    accepts = getattr(method, "accepts", lambda m: True)
    paths = [p for p, m in model.named_modules() if p and module_kind(m) in cls.layer_types]
    outer = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    return [p for p in outer if accepts(model.get_submodule(p))]


def main(root: Path) -> None:
    for label, cls, fields in cases():
        real = getattr(cls, "cls", cls)
        method = real(**fields)
        for toy in TOYS:
            if toy.name.endswith("nf4") or (toy.transformers and not getattr(real, "model_level", False)):
                continue
            model = toy.build()
            head = [toy.head] if toy.head else []
            paths = [p for p in targets(cls, method, model) if p not in head]
            if not paths:
                continue
            try:
                dt.inject(model, method, targets=paths, seed=0, modules_to_save=head)
            except ValueError:
                continue
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in dt.trainable_parameters(model):
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            x = toy.inputs(torch.Generator().manual_seed(0))
            with torch.no_grad():
                y = model(x)
            folder = root / label.replace("[", "-").replace("]", "")
            dt.save(model, folder)
            base = {f"base.{k}": v.contiguous() for k, v in toy.build().state_dict().items()}
            save_file(
                {**base, "x": x.contiguous(), "y": y.contiguous()}, str(folder / "reference.safetensors")
            )
            (folder / "case.json").write_text(json.dumps({"method": label, "toy": toy.name}) + "\n")
            print(f"{label}: {toy.name} -> {folder}")
            break
        else:
            print(f"{label}: no toy fits", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
