"""Per-request state is per request: ``route``, ``disabled`` and ``adapter_precision_as`` blocks are
context-local, so threads and asyncio tasks serving one model at once each get their own rows and
never another request's adapters (issue 24: before, 105 of 200 threaded forwards got the wrong ones).
``set_active`` is the model's own switch and says so."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import threading
from collections.abc import Callable, Sequence
from functools import partial

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.kernels import lowrank
from toy_models import TOYS

NAMES = ("a0", "a1", "a2")
# Each request's plan: which adapter each of its four rows uses (None: the base).
PLANS: list[list[str | None]] = [
    ["a0", "a1", None, "a2"],
    ["a2", "a2", "a0", None],
    [None, "a0", "a1", "a1"],
    ["a1", None, "a2", "a0"],
]


def served() -> tuple[nn.Module, torch.Tensor]:
    """A toy with three LoRAs whose updates are far from zero (a wrong adapter shows), and a batch."""
    model = TOYS[1].build().eval()
    for i, name in enumerate(NAMES):
        dt.inject(
            model, dt.LoRA(rank=2 + 2 * i, alpha=4), targets=["q_proj", "v_proj", "o_proj"], name=name, seed=i
        )
        with torch.no_grad():
            for layer in dt.attachment_of(model).layers(name).values():
                layer.lora_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(10 + i))  # type: ignore[operator]
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    return model, x


def expected(model: nn.Module, x: torch.Tensor, plans: Sequence[Sequence[str | None]]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for plan in plans:
            with dt.route(model, list(plan)):
                out.append(model(x))
    # (the plans give different outputs, so a request answered with another's adapters is caught)
    assert all(not torch.allclose(a, b) for i, a in enumerate(out) for b in out[i + 1 :])
    return out


def together(*work: Callable[[], None]) -> None:
    """Run each of ``work`` in a thread of its own, all at once, and wait for them."""
    threads = [threading.Thread(target=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wrong(got: torch.Tensor, want: torch.Tensor) -> bool:
    return not torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_threads_routing_different_plans_get_their_own_rows() -> None:
    """Four threads, each routing its own plan through one model, 100 blocks of one forward each
    (the way a threaded server serves requests), then 100 forwards in one long block: 0 wrong of
    800."""
    model, x = served()
    want = expected(model, x, PLANS)
    errors: list[tuple[int, int]] = []
    start = threading.Barrier(len(PLANS))

    def serve(k: int) -> None:
        start.wait()
        with torch.no_grad():
            for i in range(100):
                with dt.route(model, PLANS[k]):
                    if wrong(model(x), want[k]):
                        errors.append((k, i))
            with dt.route(model, PLANS[k]):
                for i in range(100):
                    if wrong(model(x), want[k]):
                        errors.append((k, 100 + i))

    together(*(partial(serve, k) for k in range(len(PLANS))))
    assert errors == [], f"{len(errors)} of 800 forwards got another request's adapters"
    assert dt.attachment_of(model).switch.routing is None and not dt.attachment_of(model).switch.scoped_open


def test_overlapping_blocks_in_two_threads_keep_their_own_plans() -> None:
    """Deterministic overlap: both threads are inside their blocks before either runs a forward
    (with a model-wide plan the second block would serve both)."""
    model, x = served()
    want = expected(model, x, PLANS[:2])
    inside = threading.Barrier(2)
    got: dict[int, torch.Tensor] = {}

    def serve(k: int) -> None:
        with torch.no_grad(), dt.route(model, PLANS[k]):
            inside.wait()
            got[k] = model(x)
            inside.wait()  # (neither block closes before both forwards ran)

    together(partial(serve, 0), partial(serve, 1))
    assert not wrong(got[0], want[0]) and not wrong(got[1], want[1])


def test_asyncio_tasks_routing_different_plans_get_their_own_rows() -> None:
    """Four asyncio tasks on one event loop, each yielding to the others inside its block before
    every forward (so all four blocks are open at once), 100 forwards each: 0 wrong of 400."""
    model, x = served()
    want = expected(model, x, PLANS)

    async def serve(k: int) -> list[int]:
        bad = []
        for i in range(100):
            with dt.route(model, PLANS[k]):
                await asyncio.sleep(0)
                # (grad mode is the thread's, not the task's: no_grad must not span an await)
                with torch.no_grad():
                    if wrong(model(x), want[k]):
                        bad.append(i)
        return bad

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(serve(k) for k in range(len(PLANS)))))

    results = asyncio.run(main())
    assert sum(map(len, results)) == 0, f"{sum(map(len, results))} of 400 forwards got another's adapters"


def test_to_thread_inside_a_block_carries_the_plan() -> None:
    """``asyncio.to_thread`` (and ``contextvars.copy_context().run``) run in a copy of the block's
    context, so a forward handed to a worker thread is routed as the block says."""
    model, x = served()
    (want,) = expected(model, x, PLANS[:1])

    async def main() -> torch.Tensor:
        with dt.route(model, PLANS[0]):
            out: torch.Tensor = await asyncio.to_thread(model, x)
        return out.detach()

    assert not wrong(asyncio.run(main()), want)
    got: list[torch.Tensor] = []
    with torch.no_grad(), dt.route(model, PLANS[0]):
        context = contextvars.copy_context()
        worker = threading.Thread(target=lambda: got.append(context.run(model, x)))
        worker.start()
        worker.join()
    assert not wrong(got[0], want)


def test_disabled_in_one_thread_leaves_the_others_adapters_on() -> None:
    """A thread computing the base's output (``disabled``) while another serves an adapter: each
    gets its own."""
    model, x = served()
    dt.set_active(model, "a1")
    with torch.no_grad():
        adapted = model(x)
        with dt.disabled(model):
            base = model(x)
    assert wrong(adapted, base)
    inside = threading.Barrier(2)
    got: dict[str, torch.Tensor] = {}

    def reference() -> None:
        with torch.no_grad(), dt.disabled(model):
            inside.wait()
            got["base"] = model(x)
            inside.wait()

    def serve() -> None:
        with torch.no_grad():
            inside.wait()
            got["adapted"] = model(x)
            inside.wait()

    together(reference, serve)
    assert not wrong(got["base"], base) and not wrong(got["adapted"], adapted)
    assert dt.attachment_of(model).switch.enabled


def test_adapter_precision_block_is_its_threads_own() -> None:
    seen: dict[str, str] = {}
    inside = threading.Barrier(2)

    def widened() -> None:
        with dt.adapter_precision_as("adapter"):
            inside.wait()
            seen["block"] = lowrank.adapter_precision()
            inside.wait()

    def other() -> None:
        inside.wait()
        seen["other"] = lowrank.adapter_precision()
        inside.wait()

    together(widened, other)
    assert seen == {"block": "adapter", "other": "input"}
    assert lowrank.adapter_precision() == "input"


def test_set_active_is_model_wide() -> None:
    """``set_active`` is the model's switch (documented so): another thread sees the change."""
    model, _ = served()
    dt.set_active(model, "a2")
    seen: list[tuple[str, ...]] = []
    worker = threading.Thread(target=lambda: seen.append(dt.attachment_of(model).active))
    worker.start()
    worker.join()
    assert seen == [("a2",)]
    assert "Model-wide" in (dt.set_active.__doc__ or "")


def test_adapter_precision_is_a_property_of_the_model_not_of_the_process() -> None:
    """``set_adapter_precision(model, ...)`` changes that model's adapters only; a block wins over it."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    dt.inject(a, dt.LoRA(rank=2), targets=["0"])
    with torch.no_grad():
        a[0].adapters["default"].lora_B.normal_()
    b = copy.deepcopy(a)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    narrow = a(x)
    dt.set_adapter_precision(a, "adapter")
    wide = a(x)
    assert not torch.equal(wide, narrow)  # float32 adapter path on a
    assert torch.equal(b(x), narrow)  # b keeps the default: nothing global changed
    with dt.adapter_precision_as("input"):
        assert torch.equal(a(x), narrow)  # the block wins over the model's setting
    assert torch.equal(copy.deepcopy(a)(x), wide)  # copies keep it
    with pytest.raises(ValueError, match="one of input, adapter"):
        dt.set_adapter_precision(a, "fp32")
