"""The help of every ``deltatune train`` option, and how its flag is typed (read by :mod:`.main`)."""

from __future__ import annotations

from typing import Any

# Help for every training option; {names} are filled in (a test checks that every flag has help).
TRAIN_HELP: dict[str, str] = {
    "model": "base model: an alias ({aliases}), a local folder in Hugging Face format, or a hub name",
    "task": "the task and its data: one of {tasks}",
    "method": "a registered method ({methods}), full (every parameter trains) or head (only the task "
    "head trains); `deltatune methods` lists them, `--method NAME --help` adds the method's fields here",
    "targets": "modules to adapt, by name, dotted suffix or regex, all-linear, or query-value (the "
    "attention query and value projections); the weights of fused MoE experts by name too "
    "(experts.gate_up_proj, experts.down_proj: LoRA) (default: the method's own placement, else "
    "query-value where the model has them, else all-linear: deltatune.targets.default_targets)",
    "modules_to_save": "modules trained in full and saved with the adapter (default: the task head)",
    "steps": "optimizer steps",
    "batch_size": "examples per micro-batch (split across the processes under torchrun)",
    "grad_accum": "micro-batches per optimizer step: the global batch is BATCH_SIZE x GRAD_ACCUM",
    "lr": "peak learning rate (default: the method's own, chosen on a validation split: `deltatune "
    "methods` lists them; full fine-tuning 1.5e-4; with --loraplus-ratio 1e-3)",
    "head_lr": "learning rate of the task head (default: 1e-3; LR with --method head)",
    "loraplus_ratio": "LoRA+ (Hayou et al. 2024): B factors (lora_B) and the adapter's vectors train at "
    "LR x this (the paper suggests 16; default: no LoRA+)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps with a linear warmup, in [0, 1)",
    "schedule": "learning rate after the warmup: one of {schedules}",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "max_length": "truncate inputs to this many tokens",
    "train_limit": "train on a seeded sample of this many examples (default: all)",
    "eval_limit": "evaluate on a sample of this many examples, the same draw for every seed and method "
    "(default: all)",
    "validation": "hold this many training examples out (the same draw for every seed and method) and "
    "report the metrics on them too (metrics.json: validation): choose settings on these, not on the "
    "eval split (0: none)",
    "eval_every": "also evaluate every N steps (0: only at the end)",
    "eval_before": "also evaluate before training",
    "eval_batch_size": "examples per evaluation batch",
    "max_new_tokens": "generation tasks: tokens generated per example",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: never)",
    "seed": "seeds the data order and the head and adapter initialisation",
    "precision": "one of {precisions}: float32, or bfloat16 autocast",
    "adapter_precision": "the dtype the adapters compute in: input (the activations', e.g. bf16; the "
    "float32 factors are cast) or adapter (float32)",
    "fsdp": "under torchrun, shard the model block by block with FSDP2 instead of replicating it "
    "(DDP); needs --checkpoint-every 0",
    "compile": "torch.compile each transformer block (regional; deltatune.compile): the first steps "
    "compile, the others run faster",
    "activation_checkpointing": "keep only each transformer block's inputs and recompute its activations in "
    "backward (deltatune.checkpoint_blocks): much less memory at long sequences for about one more forward "
    "pass; composes with --compile and --fsdp; `deltatune estimate --activation-checkpointing` says how much",
    "out": "folder for adapter/, metrics.json, curves.png and checkpoint/ (default: runs/TASK-METHOD); "
    "one holding a run of another config is refused unless --overwrite",
    "data_dir": "folder of the data sets (default: $DELTATUNE_DATA, else ../shared/datasets)",
    "resume": "continue from the checkpoint in --out (a run of the same config)",
    "data": "train on your own data instead of --task: a .jsonl, .json, .csv, .tsv or .parquet file, a "
    "folder of them, a save_to_disk folder, or a hub data set name; the format is detected from the columns "
    "(messages, prompt + completion, text + label, text)",
    "eval_data": "held-out data in the same format (default: a seeded --eval-fraction of --data)",
    "eval_fraction": "with --data and no --eval-data: the share of it held out for evaluation",
    "data_format": "force the format of --data: one of {data_formats} (default: detected from the columns)",
    "text_column": "the column holding the text (formats text, classification, regression)",
    "text_pair_column": "a second text column (sentence pairs; classification, regression)",
    "label_column": "the column holding the label (class name or index; a number for regression)",
    "prompt_column": "the prompt column (format prompt_completion)",
    "completion_column": "the completion column (format prompt_completion)",
    "messages_column": "the column holding the conversations, lists of {{role, content}} (format messages)",
    "loss_on": "assistant: the loss covers the assistant turns (messages) or the completion "
    "(prompt_completion) only; all: every token",
    "chat_template": "a Jinja chat template file for a model whose tokenizer has none (or to replace it); "
    "recorded with the adapter for deltatune chat",
    "eval_generate": "with --data: greedy answers for this many held-out prompts, scored (exact match, "
    "BLEU, ROUGE-L; answer accuracy for '#### N' answers) and written to OUT/generations.jsonl",
    "group_by_length": "batch tokenised examples of similar length together (the causal formats of --data): "
    "less padding, the same examples per epoch",
    "streaming": "with --data and --eval-data: read and tokenise the training file while training (the "
    "first step starts at once and nothing is cached; the format is told from the first rows)",
    "report_to": "also record the run with {reporters} (optional packages; besides metrics.json and the PNG)",
    "quantize": "store the frozen base's linear layers in 4 bits: nf4 (NormalFloat through torchao; the "
    "quant extra). With --method lora that is QLoRA; with --init pissa, milora or corda the adapter keeps "
    "the principal part in float and the base holds the 4-bit residual (QPiSSA). The adapter records it; "
    "eval, generate, chat and merge rebuild the same base (default: the base in its own precision)",
    "add_tokens": "add these special tokens to the tokenizer before training (e.g. <|tool_call|>); the "
    "embeddings grow to match, their new rows starting at the mean of the others. The adapter records "
    "them: generate, chat, eval and merge add them again. Train their rows with --method trainable_tokens",
    "trainable_tokens": "with --method trainable_tokens: the tokens whose embedding rows (and tied head "
    "rows) train (default: those of --add-tokens)",
    "quantize_iterations": "QPiSSA with --quantize and a weight-derived --init: refit the adapter to "
    "what 4 bits leave out this many times in all (1: plain QPiSSA; the paper's multi-iteration scheme "
    "uses 5)",
}
NO_DEFAULT_SHOWN = (
    "out",
    "data",
    "eval_data",
    "data_format",
    "text_pair_column",
    "chat_template",
    "report_to",
    "lr",
    "head_lr",
    "loraplus_ratio",
    "train_limit",
    "eval_limit",
    "data_dir",
    "quantize",
)  # their help says it


#: The types of the training options whose default (None) does not tell it.
OPTION_TYPES: dict[str, Any] = {
    **dict.fromkeys(("lr", "head_lr", "loraplus_ratio"), float),
    **dict.fromkeys(("train_limit", "eval_limit"), int),
    **dict.fromkeys(("data_dir", "data", "eval_data", "text_pair_column", "chat_template", "quantize"), str),
}
