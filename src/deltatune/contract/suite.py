"""What the invariant suite (``tests/test_invariants.py``) needs to know to run a method on tiny
models. It stays with the method, not in a table in the tests, so that a new method touches only its
own file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Suite:
    """Facts for the invariant suite, declared once per method (``suite = Suite(...)``).

    Attributes:
        example: field values that fit tiny models (also used by the docs and the CLI).
        variants: other configurations the suite runs too: a label -> ``{"fields": {...}, ...}``,
            the fields in JSON form (initialisers as ``{"type": ...}``), the other keys refining the
            capabilities and the facts below for that variant (``layer_types``, ``quantized_base``,
            ``random_init``, ``calibration``).
        near_identity_at_init: a method that is not ``identity_at_init`` still starts a small step
            from the base (False for prompts and prefixes, which change every output at once).
        random_init: the seed changes the initial tensors (False where the init is a constant or
            comes from the weight or a fixed key).
    """

    example: Mapping[str, Any] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    near_identity_at_init: bool = True
    random_init: bool = True
