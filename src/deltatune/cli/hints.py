"""What to type instead: the method names people bring from papers and other libraries.

Many of the field's names are not methods here but a method with a field or an option: QLoRA is
LoRA on a 4-bit base, PiSSA is LoRA with a weight-derived initialiser, rsLoRA a scaling flag.
:func:`canonical_method` takes what a user typed for ``--method`` and returns the registered name
(case, ``-`` and ``_`` aside), or raises an error that says what to write instead: the flags that
do it, or the closest names for a typo.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["METHOD_HINTS", "NOT_HERE", "canonical_method"]

#: A name that is a method here with a field or an option -> the flags that ask for it.
METHOD_HINTS: dict[str, str] = {
    "qlora": "--method lora --quantize nf4 (QLoRA: LoRA on a 4-bit NF4 base)",
    "qpissa": "--method lora --init pissa --quantize nf4 --quantize-iterations 5 "
    "(QPiSSA: PiSSA's residual in 4 bits, refitted 4 times)",
    "pissa": "--method lora --init pissa",
    "milora": "--method lora --init milora",
    "corda": "--method lora --init corda",
    "rslora": "--method lora --rank-stabilized true (rsLoRA: alpha / sqrt(rank) scaling)",
    "loraplus": "--method lora --loraplus-ratio 16 (LoRA+: the B factors at 16 x the learning rate)",
    "lora+": "--method lora --loraplus-ratio 16 (LoRA+: the B factors at 16 x the learning rate)",
    "said": "--method intrinsic (SAID: intrinsic-dimension fine-tuning)",
    "prefix": "--method prefix_tuning",
    "prompt": "--method prompt_tuning",
    "ptuning": "--method p_tuning",
    "bottleneck": "--method adapter (bottleneck adapters: Houlsby, Pfeiffer)",
    "houlsby": "--method adapter (bottleneck adapters: Houlsby, Pfeiffer)",
    "pfeiffer": "--method adapter (bottleneck adapters: Houlsby, Pfeiffer)",
    "finetune": "--method full (every parameter trains)",
    "fft": "--method full (every parameter trains)",
    "linear_probe": "--method head (only the task head trains)",
    "probe": "--method head (only the task head trains)",
}

#: Methods of other libraries that deltatune does not have (PEFT's names), said plainly.
NOT_HERE = ("ia3", "loha", "lokr", "oft", "boft", "hra", "fourierft", "ln_tuning", "loftq", "xlora")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def canonical_method(name: str, known: Iterable[str], *, flag: str = "--method") -> str:
    """The registered name ``name`` stands for, or a ``ValueError`` that says what to write.

    ``known``: the names the command takes (the registry, ``full``, ``head``). ``LoRA-FA`` is
    ``lora_fa``; ``qlora`` is an error pointing at ``--method lora --quantize nf4``; ``lorra`` one
    listing ``lora`` first.
    """
    names = list(known)
    key = _key(name)
    by_key = {_key(n): n for n in names}
    if key in by_key:
        return by_key[key]
    bare = key.replace("_", "")
    hint = METHOD_HINTS.get(key) or METHOD_HINTS.get(bare)
    if hint is not None:
        return _refuse(f"{flag} {name}: write {hint}")
    if key in NOT_HERE or bare in NOT_HERE:
        return _refuse(
            f"{flag} {name}: deltatune has no {name} (the methods are {', '.join(sorted(names))}; "
            "deltatune methods describes them)"
        )
    close = difflib.get_close_matches(key, [*by_key, *METHOD_HINTS], n=3, cutoff=0.6)
    said = [by_key.get(c, c) for c in close]
    if said:
        pointer = f"did you mean {' or '.join(said)}?"
        if said[0] in METHOD_HINTS:
            pointer += f" ({said[0]}: {METHOD_HINTS[said[0]]})"
    else:
        pointer = "deltatune methods lists them"
    return _refuse(f"{flag} {name}: no such method ({pointer}); one of {', '.join(sorted(names))}")


def _refuse(message: str) -> str:
    raise ValueError(message)
