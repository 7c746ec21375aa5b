"""A SmolLM2 adapter trained with ``deltatune train``, run by llama.cpp itself (issue 28).

1. ``deltatune train --model smollm2 --data GSM8K-as-chat`` (LoRA r16 on the attention and MLP
   projections, ``--steps`` steps), then ``deltatune export --to gguf --gguf-type f32`` (the LoRA as
   llama.cpp's adapter file, the shipped Q4_1 base dequantised to f32 beside it) and ``--to
   gguf-merged`` in f16 and Q8_0.
2. llama-cpp-python (``pip install llama-cpp-python``: it builds llama.cpp from source) loads the
   base with the adapter, and the merged files, and runs the same token ids as deltatune's model
   (transformers, float32): the next-token logits at every position of each prompt, and a greedy
   continuation of 32 tokens.

Reported per llama.cpp configuration: the relative logit difference to deltatune's model
(‖Δ‖/‖ours‖ over all positions), the top-1 agreement over every position of the prompts and of
deltatune's 32-token continuations (teacher-forced: each step is scored on the same prefix), how many
of the greedy continuations are identical token for token, and, for the adapter, the Pearson
correlation between the adapter's logit change in llama.cpp (base+LoRA minus base) and in deltatune.

    .venv/bin/pip install llama-cpp-python==0.3.36          # 15-30 min on 2 cores
    .venv/bin/python benchmarks/deploy.py --json benchmarks/results/deploy/llama_cpp.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gsm8k_chat import write_chat_files  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # type: ignore[import-not-found]

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "What is the capital of France?",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 32


def deltatune(*argv: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "deltatune.cli", *argv], check=True, env=env)


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (n, vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, Any]:
    a, b = np.concatenate(ours), np.concatenate(theirs)
    return {
        "relative_logit_difference": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "positions": int(a.shape[0]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    p.add_argument("--work", help="folder for the run and the files (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--reuse", action="store_true", help="keep the run and the exports already in --work")
    args = p.parse_args(argv)
    from llama_cpp import Llama

    from deltatune.formats.io import load as load_adapter
    from deltatune.train.models import load_model

    root = Path(args.work or tempfile.mkdtemp(prefix="deltatune-llama-cpp-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train_file, held_file = write_chat_files(Path(args.data_dir), root / "data", 400, 20)
    run = root / "run"
    train = ["train", "--model", "smollm2", "--data", str(train_file), "--eval-data", str(held_file)]
    train += ["--method", "lora", "--rank", "16", "--alpha", "32", "--steps", str(args.steps)]
    train += ["--targets", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train += ["--lr", "1e-3"]
    train += ["--batch-size", "4", "--max-length", "256", "--checkpoint-every", "0", "--no-progress"]
    adapter = run / "adapter"
    if not (args.reuse and (root / "merged-q8_0").is_dir()):
        deltatune(*train, "--out", str(run), "--overwrite", env=env)
        export = ["export", str(adapter), "--overwrite", "--out"]
        deltatune(*export, str(root / "gguf"), "--to", "gguf", "--gguf-type", "f32", env=env)
        for kind in ("f16", "q8_0"):
            deltatune(
                *export, str(root / f"merged-{kind}"), "--to", "gguf-merged", "--gguf-type", kind, env=env
            )

    loaded, tokenizer = load_model("smollm2", "generation")
    model: Any = loaded.eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in PROMPTS
    ]
    prompts = [list(map(int, tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts]

    def ours(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
        return np.asarray(logits.double().numpy())

    def greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        return [int(t) for t in out[0, len(ids) :]]

    base_logits = [ours(ids) for ids in prompts]
    load_adapter(model, adapter)
    continuations = [greedy(ids) for ids in prompts]
    scored = [ids + cont for ids, cont in zip(prompts, continuations, strict=True)]
    adapted_logits = [ours(ids) for ids in scored]

    options: dict[str, Any] = {
        "n_ctx": 512,
        "logits_all": True,
        "verbose": False,
        "n_threads": os.cpu_count() or 2,
    }
    base_file = next((root / "gguf").glob("base-*.gguf"))
    result: dict[str, Any] = {"config": vars(args), "prompts": len(prompts), "new_tokens": NEW_TOKENS}
    plain = Llama(model_path=str(base_file), **options)
    their_base = [llama_logits(plain, ids) for ids in prompts]
    result["base f32 (no adapter)"] = compare(base_logits, their_base)
    del plain
    runs = {
        "base f32 + adapter.gguf": Llama(
            model_path=str(base_file), lora_path=str(root / "gguf" / "adapter.gguf"), **options
        ),
        "merged f16": Llama(model_path=str(next((root / "merged-f16").glob("*.gguf"))), **options),
        "merged q8_0": Llama(model_path=str(next((root / "merged-q8_0").glob("*.gguf"))), **options),
    }
    for name, llm in runs.items():
        theirs = [llama_logits(llm, ids) for ids in scored]
        row = compare(adapted_logits, theirs)
        same = [
            llama_greedy(llm, ids, NEW_TOKENS) == cont
            for ids, cont in zip(prompts, continuations, strict=True)
        ]
        row["identical_greedy_continuations"] = f"{sum(same)}/{len(same)}"
        if name.startswith("base"):
            change_ours = np.concatenate(
                [a[: len(b)] - b for a, b in zip(adapted_logits, base_logits, strict=True)]
            )
            change_theirs = np.concatenate(
                [t[: len(b)] - tb for t, b, tb in zip(theirs, base_logits, their_base, strict=True)]
            )
            row["adapter_change_correlation"] = float(
                np.corrcoef(change_ours.ravel(), change_theirs.ravel())[0, 1]
            )
        result[name] = row
        print(f"{name}: {row}", flush=True)
    print(f"base f32 (no adapter): {result['base f32 (no adapter)']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
