"""Memory and time of training on a large chat file: Arrow, memory-mapped, tokenised once (issue 25).

Generates a chat JSONL of ``--big-mb`` megabytes (default 320) and one of 1 MB, in the ``messages``
format, and runs ``deltatune train --data FILE`` on each as its own process (``--steps`` steps of
LoRA on a 2-layer Llama with SmolLM2-135M-Instruct's tokenizer and chat template, so that the data
path, not the model, decides the memory), in a fresh data cache. Each run's peak resident memory is
its own (``os.wait4``). The big file is then trained on a second time, reading the tokenised cache.

Goal: the big file's peak RSS within 300 MB of the small file's; the second run faster by the time
the first spent reading and tokenising. A third run streams the big file (``--streaming true``, a
separate 10 kB ``--eval-data``, a fresh cache): it trains without converting or tokenising the file
first, so its time is the steps' own.

    .venv/bin/python benchmarks/data_memory.py --json benchmarks/results/data/data_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TOPICS = ("the garden", "a train timetable", "bread", "the tides", "a budget", "chess openings", "rain")


def write_chat(path: Path, megabytes: float, seed: int) -> int:
    """Conversations (a system turn now and then, one to three exchanges) until the file holds
    ``megabytes``; returns the number of conversations."""
    rng = random.Random(seed)
    words = [
        "you",
        "can",
        "the",
        "to",
        "of",
        "and",
        "a",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "be",
        "this",
        "at",
        "by",
        "from",
        "or",
    ]
    target = int(megabytes * 1_000_000)
    written = rows = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            turns = []
            if rng.random() < 0.3:
                turns.append({"role": "system", "content": "You are a concise assistant."})
            for _ in range(rng.randint(1, 3)):
                topic = rng.choice(TOPICS)
                question = f"Tell me about {topic}, in {rng.randint(2, 9)} sentences."
                answer = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            line = json.dumps({"messages": turns}) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


def tiny_model(folder: Path) -> None:
    """A 2-layer Llama with SmolLM2-135M-Instruct's tokenizer (converted once into deltatune's cache)."""
    import transformers

    from deltatune.train.smollm2 import ensure_smollm2_cache

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_smollm2_cache())
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of process ``pid``, in kB (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def run(model: Path, data: Path, out: Path, cache: Path, steps: int, *extra: str) -> dict[str, float]:
    """One ``deltatune train`` process: its wall time, its own peak resident memory (``os.wait4``)
    and, sampled every 50 ms, the peaks of its anonymous memory and of the file pages it maps (the
    memory-mapped Arrow tables it reads count toward the resident total, but they are clean page cache
    the kernel takes back under pressure)."""
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--model", str(model), "--data", str(data), *extra]
    cmd += ["--checkpoint-every", "0", "--method", "lora", "--targets", "all-linear", "--no-progress"]
    # 128 tokens: nearly every conversation fills it, so both files train on batches of one shape and
    # the logits (4 x 128 x 49,152 floats) cost the same in both runs; what differs is the data path
    cmd += ["--steps", str(steps), "--batch-size", "4", "--max-length", "128", "--eval-fraction", "0.0005"]
    # evaluation in batches of the same shape: 64 x 128 x 49,152 float logits would cost 1.6 GB on the big
    # file's 212 held-out conversations and nothing on the small file's one
    cmd += ["--eval-batch-size", "4", "--out", str(out), "--overwrite"]
    env = {**os.environ, "DELTATUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return measured(cmd, env, str(data))


def measured(cmd: list[str], env: dict[str, str], what: str) -> dict[str, float]:
    """Run ``cmd`` as its own process: its wall time, its peak resident memory (``os.wait4``) and,
    sampled every 50 ms, the peaks of its anonymous and file-backed resident memory (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, value in _status(proc.pid).items():
            if key in peaks:
                peaks[key] = max(peaks[key], value)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    reader.join()
    if status:
        raise SystemExit(f"deltatune train failed on {what}:\n{''.join(output)}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
        "peak_file_mb": round(peaks["RssFile"] / 1024, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-mb", type=float, default=320.0)
    p.add_argument("--small-mb", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="deltatune-data-memory-"))
    try:
        model = root / "model"
        tiny_model(model)
        result: dict[str, Any] = {"config": vars(args)}
        for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
            data = root / f"{name}.jsonl"
            rows = write_chat(data, mb, seed=0)
            result[name] = {"file_mb": round(data.stat().st_size / 1e6, 1), "conversations": rows}
            cache = root / f"cache-{name}"
            result[name]["first"] = run(model, data, root / f"run-{name}", cache, args.steps)
            print(f"{name}: {result[name]}", flush=True)
        big_file = root / "big.jsonl"
        result["big"]["again"] = run(model, big_file, root / "run-big", root / "cache-big", args.steps)
        held = root / "held.jsonl"
        write_chat(held, 0.01, seed=1)
        streamed = run(
            model,
            big_file,
            root / "run-stream",
            root / "cache-stream",
            args.steps,
            "--streaming",
            "true",
            "--eval-data",
            str(held),
        )
        result["big"]["streamed"] = streamed
        print(f"streamed: {streamed}", flush=True)
        cache_bytes = sum(f.stat().st_size for f in (root / "cache-big").rglob("*") if f.is_file())
        result["big"]["cache_mb"] = round(cache_bytes / 1e6, 1)
        big, small = result["big"], result["small"]
        result["rss_difference_mb"] = round(big["first"]["peak_rss_mb"] - small["first"]["peak_rss_mb"], 1)
        result["seconds_saved_by_cache"] = round(big["first"]["seconds"] - big["again"]["seconds"], 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first, again = big["first"], big["again"]
    print(
        f"peak RSS: {small['first']['peak_rss_mb']:.0f} MB on {small['file_mb']} MB, "
        f"{first['peak_rss_mb']:.0f} MB on {big['file_mb']} MB (difference {result['rss_difference_mb']:.0f} "
        f"MB); second run on the big file {again['seconds']:.0f} s instead of {first['seconds']:.0f} s "
        f"(cache {big['cache_mb']:.0f} MB on disk); streamed: {big['streamed']['seconds']:.0f} s, "
        f"peak RSS {big['streamed']['peak_rss_mb']:.0f} MB"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
