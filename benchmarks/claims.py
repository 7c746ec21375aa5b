"""The papers' claims against the tuned comparison (issue 30): one line each, reproduced or not here.

    .venv/bin/python benchmarks/claims.py benchmarks/results/tuned   # claims.md from results.json

Run by ``compare.py --preset tuned --lr-grid --seeds 0 1 2`` after its tables. Every method ran at its
own rate (chosen on a validation split), three seeds, on SST-2 and AG News with MiniLM-L6 and 150
steps. A difference counts when it exceeds twice its standard error over the seeds
(``sqrt(s_a²/n_a + s_b²/n_b)``); "≈" holds when the method is at most ``NEAR`` points below LoRA.
Verdicts: *reproduced*, *not separated* (the difference lies within the seeds' noise), *not at this
scale* (the opposite of the claim, or the bytes do not match what it says).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare_report import spread

NEAR = 1.0  # points: "≈ LoRA" allows this much below LoRA's mean
LORA, LORA_R4 = "LoRA r=8", "LoRA r=4"
VBLORA, VERA, DORA, DORA_R4 = "VB-LoRA r=4 b=64 k=2", "VeRA r=128", "DoRA r=8", "DoRA r=4"
PISSA, LORAPLUS, ADALORA = "PiSSA r=8", "LoRA+ r=8 (ratio 16)", "AdaLoRA r 6 -> 4"
LABELS = (LORA, LORA_R4, VBLORA, VERA, DORA, DORA_R4, PISSA, LORAPLUS, ADALORA)

Rows = dict[tuple[str, str], list[dict[str, Any]]]


def grouped(rows: list[dict[str, Any]]) -> Rows:
    out: Rows = {}
    for r in rows:
        out.setdefault((r["task"], r["method"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two sets of seeds' values, with the standard error of the difference."""

    a: tuple[float, float, int]  # mean, std, seeds
    b: tuple[float, float, int]

    @classmethod
    def of(cls, a: list[float], b: list[float]) -> Difference:
        return cls((*spread(a), len(a)), (*spread(b), len(b)))

    @property
    def delta(self) -> float:
        return self.a[0] - self.b[0]

    @property
    def error(self) -> float:
        return float((self.a[1] ** 2 / self.a[2] + self.b[1] ** 2 / self.b[2]) ** 0.5)

    def above(self) -> str:
        """The verdict on "a beats b": separated above, below, or not separated."""
        if self.delta > 2 * self.error:
            return "reproduced"
        return "not at this scale" if self.delta < -2 * self.error else "not separated"

    def text(self, unit: str = "", digits: int = 2) -> str:
        (ma, sa, _), (mb, sb, _) = self.a, self.b
        return (
            f"{ma:.{digits}f} ± {sa:.{digits}f}{unit} vs {mb:.{digits}f} ± {sb:.{digits}f}{unit} "
            f"(Δ {self.delta:+.{digits}f}, 2·s.e. {2 * self.error:.{digits}f})"
        )


def metric(rows: Rows, task: str, label: str) -> list[float]:
    return [r["metric"] for r in rows.get((task, label), [])]


def stored(rows: Rows, task: str, label: str) -> int:
    return int(rows[(task, label)][0]["stored_bytes"])


def tasks(rows: Rows) -> list[str]:
    return list(dict.fromkeys(t for t, _ in rows))


def overall(verdicts: list[str]) -> str:
    """One verdict from the tasks': all equal gives it, otherwise "mixed"."""
    if not verdicts:
        return "not run"
    return verdicts[0] if len(set(verdicts)) == 1 else "mixed (" + " / ".join(verdicts) + ")"


def per_task(
    rows: Rows, label: str, other: str, judge: Callable[[str, Difference], tuple[str, str]]
) -> tuple[str, str]:
    """``judge(task, label's metric - other's)`` on every task both rows ran: one verdict, the numbers."""
    verdicts, parts = [], []
    for task in tasks(rows):
        if not metric(rows, task, label) or not metric(rows, task, other):
            continue
        verdict, part = judge(task, Difference.of(metric(rows, task, label), metric(rows, task, other)))
        verdicts.append(verdict)
        parts.append(f"{task}: {part}")
    return overall(verdicts), "; ".join(parts)


def near_lora(rows: Rows, label: str, fewer: float) -> tuple[str, str]:
    """``label`` within ``NEAR`` points of LoRA r=8 at no more than ``fewer`` of its bytes."""

    def judge(task: str, d: Difference) -> tuple[str, str]:
        ratio = stored(rows, task, label) / stored(rows, task, LORA)
        verdict = "reproduced" if d.delta >= -NEAR and ratio <= fewer else "not at this scale"
        return verdict, f"{d.text()}, {ratio:.1%} of LoRA's bytes"

    return per_task(rows, label, LORA, judge)


def beats(rows: Rows, label: str, other: str) -> tuple[str, str]:
    def judge(task: str, d: Difference) -> tuple[str, str]:
        sizes = f"{stored(rows, task, label):,} vs {stored(rows, task, other):,} bytes"
        return d.above(), f"{d.text()} ({sizes})"

    return per_task(rows, label, other, judge)


def curves(rows: Rows, task: str, label: str) -> list[list[float]] | None:
    found = [r.get("loss_curve") for r in rows.get((task, label), [])]
    return [list(c) for c in found if c] if found and all(found) else None


def reached(curve: list[float], target: float, window: int) -> int:
    """The step at which ``curve`` (one mean per ``window`` steps) first comes down to ``target``."""
    for i, value in enumerate(curve):
        if value <= target:
            return (i + 1) * window
    return len(curve) * window + window  # never: one window past the end


def sooner(rows: Rows, label: str, window: int) -> tuple[str, str]:
    """``label`` brings its training loss down to LoRA's last-window loss (same seed) in fewer steps
    than LoRA's own run."""
    verdicts, parts = [], []
    for task in tasks(rows):
        mine, lora = curves(rows, task, label), curves(rows, task, LORA)
        if mine is None or lora is None or len(mine) != len(lora):
            continue
        steps = [reached(m, ref[-1], window) for m, ref in zip(mine, lora, strict=True)]
        own = [reached(ref, ref[-1], window) for ref in lora]
        d = Difference.of([float(s) for s in own], [float(s) for s in steps])
        verdicts.append(d.above())
        parts.append(
            f"{task}: LoRA's final loss reached at step {d.b[0]:.0f} ± {d.b[1]:.0f} vs LoRA's own "
            f"{d.a[0]:.0f} ± {d.a[1]:.0f}"
        )
    return (overall(verdicts) if verdicts else "no loss curves recorded"), "; ".join(parts)


def faster(rows: Rows, label: str, window: int, early: int = 50) -> tuple[str, str]:
    """``label``'s mean training loss over the first ``early`` steps is below LoRA's."""
    verdicts, parts = [], []
    for task in tasks(rows):
        mine, lora = curves(rows, task, label), curves(rows, task, LORA)
        if mine is None or lora is None:
            continue
        n = early // window
        d = Difference.of([sum(c[:n]) / n for c in lora], [sum(c[:n]) / n for c in mine])
        verdicts.append(d.above())
        accuracy = Difference.of(metric(rows, task, label), metric(rows, task, LORA))
        parts.append(
            f"{task}: mean training loss over steps 1-{early} {d.b[0]:.3f} ± {d.b[1]:.3f} vs LoRA's "
            f"{d.a[0]:.3f} ± {d.a[1]:.3f}; final accuracy {accuracy.text()}"
        )
    return (overall(verdicts) if verdicts else "no loss curves recorded"), "; ".join(parts)


@dataclass(frozen=True)
class Claim:
    paper: str
    says: str
    check: Callable[[Rows, int], tuple[str, str]]


CLAIMS = [
    Claim(
        "VB-LoRA (Li et al., 2024)",
        "VB-LoRA ≈ LoRA at a few percent of LoRA's stored bytes",
        lambda rows, _: near_lora(rows, VBLORA, 0.10),
    ),
    Claim(
        "VeRA (Kopiczko et al., 2024)",
        "VeRA ≈ LoRA at 10× fewer bytes",
        lambda rows, _: near_lora(rows, VERA, 0.10),
    ),
    Claim(
        "DoRA (Liu et al., 2024)", "DoRA ≥ LoRA at low rank (r = 8)", lambda rows, _: beats(rows, DORA, LORA)
    ),
    Claim(
        "DoRA (Liu et al., 2024)",
        "DoRA ≥ LoRA at low rank (r = 4)",
        lambda rows, _: beats(rows, DORA_R4, LORA_R4),
    ),
    Claim(
        "PiSSA (Meng et al., 2024)",
        "PiSSA converges faster than LoRA (lower training loss early)",
        lambda rows, w: faster(rows, PISSA, w),
    ),
    Claim(
        "LoRA+ (Hayou et al., 2024)",
        "LoRA+ reaches LoRA's loss sooner",
        lambda rows, w: sooner(rows, LORAPLUS, w),
    ),
    Claim(
        "AdaLoRA (Zhang et al., 2023)",
        "AdaLoRA beats LoRA at an equal budget (LoRA r = 4: final rank 4 on the same matrices)",
        lambda rows, _: beats(rows, ADALORA, LORA_R4),
    ),
]


def report(rows: list[dict[str, Any]], window: int) -> str:
    by = grouped(rows)
    lines = [
        "| paper | claim | here | numbers (mean ± std over seeds) |",
        "|---|---|---|---|",
    ]
    for claim in CLAIMS:
        verdict, numbers = claim.check(by, window)
        lines.append(f"| {claim.paper} | {claim.says} | {verdict if numbers else 'not run'} | {numbers} |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> None:
    from compare import CURVE_WINDOW

    rows = json.loads((out / "results.json").read_text())
    (out / "claims.md").write_text(report(rows, CURVE_WINDOW))
    print(f"wrote {out / 'claims.md'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
