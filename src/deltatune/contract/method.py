"""What a method is: a frozen dataclass that subclasses :class:`Method`.

A method says *what* to add to a model (LoRA's factors, a prompt, a bias delta); the verbs of
:mod:`deltatune.runtime.core` say *where* and own the lifecycle. The base classes below group what a method
provides by concern, each with its default written here, where a reader of a method file sees what
it inherits:

* :class:`Method`: the fields (the dataclass's own), the capabilities (class data), ``wrap`` (the
  layer for one adapted module) and the closed-form counts. Required: ``name``, ``wrap``,
  ``parameter_count``, ``stored_bytes``.
* :class:`Placement`: which modules it adapts and how it is placed on a model.
* :class:`SharedState`: state shared by every layer of one adapter (VB-LoRA's bank).
* :class:`StepHooks`: what it does between optimizer steps (AdaLoRA's budget, ReLoRA's restarts).
* :class:`Storage`: what is written to ``adapter_config.json`` and how several adapters combine.
* :class:`~deltatune.contract.suite.Suite`: what the invariant suite needs to run it on tiny models.

Nothing branches on a method's type: the core and the tests read these attributes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from ..targets import TargetSpec
from .fields import validate
from .suite import Suite


class AdapterView(Protocol):
    """What a method's hooks may ask of the attachment that holds its adapter (the attachment
    itself, :class:`deltatune.runtime.wrapper.Attachment`, lives above the contract)."""

    model: nn.Module

    def info(self, name: str) -> Any: ...

    def adapter_layers(self, name: str) -> dict[str, nn.Module]: ...

    def shared(self, name: str) -> nn.Module | None: ...

    def set_module_fields(self, name: str, path: str, fields: Mapping[str, Any]) -> None: ...

    def freeze(self, name: str, params: list[nn.Parameter]) -> None: ...


L = TypeVar("L", bound=nn.Module)


def layers_of(attachment: AdapterView, name: str, kind: type[L]) -> dict[str, L]:
    """path -> adapter ``name``'s layer at each of its targets, each checked to be a ``kind`` (what a
    method's hooks act on), or a ``ValueError`` naming the module that holds something else."""
    out: dict[str, L] = {}
    for path, layer in attachment.adapter_layers(name).items():
        if not isinstance(layer, kind):
            raise ValueError(
                f"adapter {name!r}: {path!r} holds {type(layer).__name__}, not a {kind.__name__}"
            )
        out[path] = layer
    return out


class Placement:
    """Which modules a method adapts, and where it goes when no targets are given."""

    #: Module kinds it adapts: ``"linear"``, ``"conv1d"``, ``"embedding"``, ``"experts"``, ``"block"``.
    layer_types: ClassVar[tuple[str, ...]] = ("linear",)
    #: It acts on a whole transformers body (embeddings, masks, KV cache), not on single layers.
    model_level: ClassVar[bool] = False
    #: It works on 4-bit (NF4) base modules because it only adds to their output (QLoRA).
    quantized_base: ClassVar[bool] = False
    #: Why a method that cannot adapt a 4-bit base needs the float weight (quoted by the refusals).
    float_base_reason: ClassVar[str] = ""

    def default_targets(self, model: nn.Module) -> TargetSpec | None:
        """Where the method goes when no targets are given (a :data:`deltatune.targets.TargetSpec`),
        or None: no preference (:func:`deltatune.targets.default_targets` states the rule)."""
        return None

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        """Refuse targets that contradict the method's fields (accept by default)."""
        return None

    def accepts(self, module: nn.Module) -> bool:
        """Whether it can adapt a module of a supported kind (BitFit: only layers with a bias); used
        to pick targets, never to skip a named one."""
        return True

    def fit_to(self, bases: Mapping[str, nn.Module], given: Collection[str]) -> Any:
        """A copy whose fields not named in ``given`` (left at their defaults) suit the modules it
        will adapt; the harness calls it, ``inject`` never does."""
        return self


class SharedState:
    """State shared by every layer of one adapter, created once per adapter (VB-LoRA's bank).

    :func:`deltatune.inject` moves it (as each layer) to the device of the modules it serves before
    ``wrap`` sees it. A value a layer caches from tensors is keyed on all of them
    (:class:`deltatune._cache.Memo`)."""

    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> nn.Module | None:
        return None

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return 0

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        return 0


class StepHooks:
    """What a method does between optimizer steps. :mod:`deltatune.runtime.stepping` calls these for every
    active adapter, from the harness, a plain loop or the ``Trainer`` callback. State kept between
    steps lives in the layers' (or the shared module's) persistent buffers, so a checkpoint holds it."""

    #: It learns tasks one after another in one adapter, with a ``tasks`` field naming them, oldest
    #: first, of which only the last trains (O-LoRA, AM-LoRA; grown by ``continual.add_task``).
    task_sequence: ClassVar[bool] = False

    def parameter_groups(
        self, attachment: AdapterView, name: str
    ) -> dict[str, tuple[list[nn.Parameter], float]] | None:
        """Optimizer groups with their own learning-rate multipliers, or None: one group."""
        return None

    def default_lr(self) -> float:
        """The peak AdamW learning rate ``deltatune train`` uses for it when no ``--lr`` is given. Each
        method declares its own: rates differ by orders of magnitude between methods (VeRA's vectors,
        prompt embeddings, a full model), and a shared default leaves some at chance. The values are
        chosen on a validation split (benchmarks/README.md, "Each method at its own learning
        rate")."""
        return 1e-3

    def for_steps(self, total: int, given: Collection[str]) -> Any:
        """A copy fitted to a run of ``total`` optimizer steps for the fields not in ``given``, or a
        ``ValueError`` naming a field that does not fit the run."""
        return self

    def regularizer(self, attachment: AdapterView, name: str) -> torch.Tensor | None:
        """A term added to the loss before ``backward``, after the forward pass of the step's last
        micro-batch (it may read that pass), or None."""
        return None

    def on_step(self, attachment: AdapterView, name: str, step: int, optimizer: Any) -> None:
        """Called after ``optimizer.step()`` and before the gradients are cleared (``step`` from 1)."""
        return None

    def lr_factor(self, step: int) -> float:
        """A factor on the learning rate at scheduler step ``step`` (from 0), composed with the run's
        own schedule."""
        return 1.0


class Storage:
    """What is saved, and how adapters of this method combine."""

    #: Its adapters' exact sum is again an adapter of the method (LoRA: the factors side by side).
    #: Every method whose update is a weight change combines (:mod:`deltatune.arithmetic`, always
    #: into a LoRA); this flag states the narrower fact.
    combinable: ClassVar[bool] = False

    def stored_method(self) -> Any:
        """The configuration written to ``adapter_config.json`` when the saved form differs from the
        training form (PiSSA saves a plain LoRA)."""
        return self


@dataclass(frozen=True, kw_only=True)
class Method(Placement, SharedState, StepHooks, Storage):
    """The base of every method config (subclass it as a frozen, keyword-only dataclass).

    The capabilities below are facts about the method's math that the core and the invariant suite
    read (and check); a method declares the ones that hold for it.
    """

    name: ClassVar[str]  # the registry key, also written to adapter_config.json
    #: Its update folds into the base module (``merge``): ``delta_weight()`` or ``merged(base)``.
    mergeable: ClassVar[bool] = False
    #: The adapted model equals the base exactly at init.
    identity_at_init: ClassVar[bool] = False
    #: The update is a delta on the weight (``delta_weight``), so it composes additively.
    weight_space: ClassVar[bool] = False
    #: Several adapters of it can serve different rows of one batch (``route``).
    supports_mixed_batch: ClassVar[bool] = False
    #: What the invariant suite needs to know (examples, variants, facts about the init).
    suite: ClassVar[Suite] = Suite()

    def __post_init__(self) -> None:
        """Validate the fields against their declared constraints (:mod:`.fields`)."""
        validate(self)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> nn.Module:
        """The layer (:mod:`deltatune.contract.layer`) that holds the adapter's tensors for the module
        at ``path``; ``generator`` is seeded per module, ``shared`` is :meth:`make_shared`'s."""
        raise NotImplementedError(f"{type(self).__name__} must define wrap()")

    def parameter_count(self, base: nn.Module) -> int:
        """The closed form of what one module's layer trains (checked against the real tensors)."""
        raise NotImplementedError(f"{type(self).__name__} must define parameter_count()")

    def stored_bytes(self, base: nn.Module) -> int:
        """The closed form of what the saved file holds for one module (checked likewise)."""
        raise NotImplementedError(f"{type(self).__name__} must define stored_bytes()")
