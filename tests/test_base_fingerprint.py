"""The base-content fingerprint: an adapter refuses another base of the same architecture
(issue 13, point 3), unless loaded with ``strict_base=False`` / ``--no-strict-base``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli.main import build_parser
from deltatune.formats.io import CONFIG_NAME, read_config
from deltatune.runtime.fingerprint import content_hash


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))


def test_another_base_of_the_same_shape_is_refused_naming_the_module(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0", "2"])
    dt.save(model, tmp_path)
    other = net(seed=1)
    with pytest.raises(ValueError, match=r"another base model: the weights of \[0, 2\].*strict_base=False"):
        dt.load(other, tmp_path)
    assert not dt.has_adapters(other)  # refused before anything was changed
    # Only one module fine-tuned: only that one is named.
    tuned = net()
    with torch.no_grad():
        layer = tuned[2]
        assert isinstance(layer, nn.Linear)
        layer.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"the weights of \[2\] \(1 in all\)"):
        dt.load(tuned, tmp_path)
    dt.load(other, tmp_path, strict_base=False)  # on purpose
    x = torch.randn(3, 16)
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), model(x))


def test_the_hash_is_of_the_original_base_for_pissa(tmp_path: Path) -> None:
    model = net()
    original = [content_hash(model[i].weight) for i in (0, 2)]
    dt.inject(model, dt.LoRA(rank=2, init=dt.PiSSA()), targets=["0", "2"])
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.01)
    dt.save(model, tmp_path)
    fingerprint = read_config(tmp_path)["fingerprint"]
    assert [fingerprint[p][2] for p in ("0", "2")] == original
    x = torch.randn(2, 16)
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_hash_is_cheap_to_define_and_stable_across_dtypes_and_layouts() -> None:
    w = torch.randn(96, 80)
    h = content_hash(w)
    assert isinstance(h, str) and len(h) == 16
    assert content_hash(nn.Parameter(w.clone())) == h
    assert content_hash(w.double()) == h and content_hash(w.bfloat16()) == h
    assert content_hash(w.t().contiguous().t()) == h  # a non-contiguous layout of the same values
    step = w.numel() // 64
    changed = w.clone()
    changed.view(-1)[5 * step] += 0.5  # a sampled position
    assert content_hash(changed) != h
    assert content_hash(torch.empty(4, 4, device="meta")) is None
    assert content_hash(torch.zeros(4, 4, dtype=torch.uint8)) is None  # packed/quantised: skipped
    assert content_hash(None) is None
    assert content_hash(torch.randn(3)) is not None  # fewer values than the sample: all of them


def test_modules_trained_in_full_are_not_content_checked(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0"], modules_to_save=["2"])
    dt.save(model, tmp_path)
    fingerprint = read_config(tmp_path)["fingerprint"]
    assert isinstance(fingerprint["0"][2], str) and fingerprint["2"][2] is None
    other_head = net()
    torch.manual_seed(5)
    head = other_head[2]
    assert isinstance(head, nn.Linear)
    head.reset_parameters()
    dt.load(other_head, tmp_path)  # a freshly initialised head is replaced whole anyway


def test_files_without_content_hashes_still_load_on_any_base(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0"])
    dt.save(model, tmp_path)
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    config["fingerprint"] = {p: e[:2] for p, e in config["fingerprint"].items()}  # as before
    path.write_text(json.dumps(config))
    dt.load(net(seed=3), tmp_path)
    fresh = copy.deepcopy(net())
    dt.load(fresh, tmp_path)


def test_eval_and_merge_take_no_strict_base() -> None:
    parser = build_parser()
    assert parser.parse_args(["eval", "x", "--no-strict-base"]).no_strict_base is True
    assert parser.parse_args(["merge", "x", "--out", "y"]).no_strict_base is False
