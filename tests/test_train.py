"""train.py end to end on a tiny model: learning, run layout, bitwise repeatability and resume, torchrun, CLI errors."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import checkpoint
from conftest import ROOT, tiny_run
from configs import to_json
import train as train_module
from train import train


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def final_state(run_dir):
    return checkpoint.load(checkpoint.latest_complete(run_dir))


def assert_states_equal(a, b):
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pid, moments in a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["scaler"] == b["scaler"] and a["step"] == b["step"] and a["opt_step"] == b["opt_step"]


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


def test_tiny_run_learns_and_lays_out_its_run_dir(tiny_data, tmp_path):
    result = train(tiny_run(tiny_data, tmp_path / "run", max_steps=20))
    losses = train_losses(tmp_path / "run")
    assert losses[20] < losses[1] - 0.5
    assert result["val_bpb"] > 0 and result["step"] == 20
    assert (tmp_path / "run" / "config.json").is_file()
    assert checkpoint.verify(tmp_path / "run" / "checkpoints" / "step-0000020") is None
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[4])  # step 5: a diagnostics step
    for key in ("loss", "lr", "tokens_per_sec", "grad_norm", "grad_norm_clipped", "loss_scale", "skipped_steps",
                "param_norm", "time_data", "time_fwd_bwd", "time_optimizer", "act_norm", "attn_max_score"):
        assert key in row, key
    assert len(row["act_norm"]) == 2 and len(row["attn_max_score"]) == 2


def test_same_seed_is_bitwise_and_other_seeds_differ(tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "a", model=replace(tiny_run(tiny_data, tmp_path).model, dropout=0.1))
    train(cfg)
    train(replace(cfg, out_dir=tmp_path / "b"))
    train(replace(cfg, out_dir=tmp_path / "c", seed=22))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert_states_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    assert train_losses(tmp_path / "a")[1] != train_losses(tmp_path / "c")[1]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_continues_bitwise(tiny_data, tmp_path, precision):
    base = tiny_run(tiny_data, tmp_path / "straight", precision=precision,
                    model=replace(tiny_run(tiny_data, tmp_path).model, dropout=0.1))
    train(base)
    train(replace(base, out_dir=tmp_path / "resumed", max_steps=5))
    train(replace(base, out_dir=tmp_path / "resumed", resume="auto"))
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")
    assert_states_equal(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # no duplicate rows for the replayed interval


def test_rerun_from_config_json_is_bitwise(tiny_data, tmp_path):
    train(tiny_run(tiny_data, tmp_path / "first"))
    saved = json.loads((tmp_path / "first" / "config.json").read_text())
    saved["out_dir"] = str(tmp_path / "again")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    proc = run_cli("train.py", str(tmp_path / "config.json"))
    assert proc.returncode == 0, proc.stderr
    assert train_losses(tmp_path / "first") == train_losses(tmp_path / "again")


def test_signal_handlers_are_given_back_when_train_returns_or_raises(tiny_data, tmp_path, monkeypatch):
    """Inside the loop SIGTERM / SIGINT only ask for a checkpoint at the next step; once train() returns (or
    raises), a caller in a notebook or a test gets its own handlers back — Ctrl-C interrupts again."""
    mine = lambda signum, frame: None
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(tiny_run(tiny_data, tmp_path / "run", max_steps=2))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        def failing_step(*args):
            assert signal.getsignal(signal.SIGINT) is not mine  # the loop's own handler is in place
            raise RuntimeError("a step that fails")
        monkeypatch.setattr(train_module, "optimization_step", failing_step)
        with pytest.raises(RuntimeError, match="a step that fails"):
            train(tiny_run(tiny_data, tmp_path / "failed", max_steps=2))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_init_from_takes_only_the_weights(tiny_data, tmp_path):
    source = train(tiny_run(tiny_data, tmp_path / "source", final_eval_batches=0))
    # max_steps=0: no training, only the final eval of the loaded weights over the whole val split
    loaded = train(tiny_run(tiny_data, tmp_path / "loaded", init_from=tmp_path / "source", max_steps=0))
    fresh = train(tiny_run(tiny_data, tmp_path / "fresh", max_steps=0))
    assert loaded["val_loss"] == source["val_loss"] and fresh["val_loss"] > source["val_loss"] + 0.1
    train(tiny_run(tiny_data, tmp_path / "tuned", init_from=tmp_path / "source" / "checkpoints" / "step-0000010",
                   max_steps=5))
    tuned = final_state(tmp_path / "tuned")
    assert tuned["step"] == 5 and tuned["opt_step"] == 5  # the source's 10 steps are not counted
    assert all(int(moments["step"]) == 5 for moments in tuned["optimizer"]["state"].values())  # fresh AdamW


def test_init_from_refuses_other_shapes_and_missing_dirs(tiny_data, tmp_path):
    train(tiny_run(tiny_data, tmp_path / "source", max_steps=5))
    wider = replace(tiny_run(tiny_data, tmp_path).model, n_embd=64)
    with pytest.raises(ValueError, match="checkpoint has model.n_embd = 32, but --model.n-embd is 64"):
        train(tiny_run(tiny_data, tmp_path / "bad", init_from=tmp_path / "source", model=wider))
    with pytest.raises(ValueError, match="--init-from .*nowhere: no complete checkpoint"):
        train(tiny_run(tiny_data, tmp_path / "bad", init_from=tmp_path / "nowhere"))
    assert not (tmp_path / "bad").exists()  # nothing written


def torchrun(*args, nproc=2, timeout=300):
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, timeout=timeout)


def cli_args(cfg):
    """The command-line flags that rebuild `cfg` from its JSON (via a config file: exact, no drift)."""
    path = cfg.out_dir.parent / f"{cfg.out_dir.name}.json"
    path.write_text(json.dumps(to_json(cfg)))
    return [str(path)]


def test_torchrun_two_ranks_matches_one_rank_with_accumulation(tiny_data, tmp_path):
    one = tiny_run(tiny_data, tmp_path / "one", max_steps=20, global_batch_size=8, micro_batch_size=4)  # 1 × accum 2
    train(one)
    proc = torchrun("train.py", *cli_args(replace(one, out_dir=tmp_path / "two")))  # 2 ranks × accum 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert single.keys() == double.keys() and len(single) == 20
    assert all(abs(single[s] - double[s]) < 1e-5 for s in single)


def test_torchrun_resume_is_bitwise(tiny_data, tmp_path):
    base = tiny_run(tiny_data, tmp_path / "straight", precision="fp16", global_batch_size=8, micro_batch_size=2,
                    model=replace(tiny_run(tiny_data, tmp_path).model, dropout=0.1))
    assert torchrun("train.py", *cli_args(base)).returncode == 0
    half = replace(base, out_dir=tmp_path / "resumed", max_steps=5)
    assert torchrun("train.py", *cli_args(half)).returncode == 0
    proc = torchrun("train.py", *cli_args(replace(base, out_dir=tmp_path / "resumed", resume="auto")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert_states_equal(straight, resumed)
    assert len(straight["per_rank"]) == 2 and straight["per_rank"][0]["scaler"] == straight["per_rank"][1]["scaler"]


def test_help_shows_the_mistral_recipe():
    proc = run_cli("train.py", "gpt2-small", "--help", timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for expected in ("0.0006", "400000", "4000", "512", "0.999", "1e-08", "fp16", "mistral", "--optim.lr"):
        assert expected in text, expected


@pytest.mark.parametrize("flags,expected", [
    (["--global-batch-size", "30", "--micro-batch-size", "4"],
     "--global-batch-size 30 is not divisible by --micro-batch-size 4 × world size 1"),
    (["--model.n-embd", "30"], "--model.n-embd 30 is not divisible by --model.n-head 4"),
    (["--data.dir", "no/such/dir"], "no/such/dir: data directory not found"),
])
def test_bad_flags_give_one_clear_line(tmp_path, flags, expected):
    proc = run_cli("train.py", "shakespeare-cpu", "--out-dir", str(tmp_path / "run"), *flags, timeout=120)
    message = " ".join(proc.stderr.replace("│", " ").split())  # tyro draws its errors in a box
    assert proc.returncode != 0 and expected in message, proc.stderr[-2000:]


def test_the_eval_set_is_counted_in_global_batches_whatever_the_micro_batch(tiny_data, tmp_path):
    from configs import CheckpointConfig
    one_step = dict(max_steps=1, eval_interval=10**6, final_eval_batches=1, diag_interval=0,
                    checkpoint=CheckpointConfig(schedule="none", keep_last=1))
    whole = train(tiny_run(tiny_data, tmp_path / "m4", micro_batch_size=4, **one_step))
    halves = train(tiny_run(tiny_data, tmp_path / "m2", micro_batch_size=2, **one_step))
    # one global batch of 8 windows of 32 tokens: the same val set; a memory setting must not move the number
    assert whole["val_tokens"] == halves["val_tokens"] == 8 * 32
    assert halves["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    # --eval-unit micro (config files from before the change load so): one micro-batch, the old count
    old = train(tiny_run(tiny_data, tmp_path / "old", micro_batch_size=2, eval_unit="micro", **one_step))
    assert old["val_tokens"] == 2 * 32
