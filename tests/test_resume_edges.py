"""Resumes as users try them: from an earlier checkpoint (a new branch), from a copy named anything, from weights
only, far into a run on another number of ranks; and a torn metrics.jsonl, a seed or device no run can use, and
the parent directories a refused run made."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoint
import train as train_module
from conftest import tiny_run
from distributed import Dist, agree_on_resume, pick_device
from errors import UserError
from resume import seed_everything
from train import train


def lr_of(ckpt) -> float:
    return checkpoint.load(ckpt)["config"]["optim"]["lr"]


@pytest.fixture
def six_steps(tiny_data, tmp_path):
    """Checkpoints at steps 2, 4 and 6 (lr 3e-3)."""
    cfg = tiny_run(tiny_data, tmp_path / "run", max_steps=6,
                   checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=2))
    train(cfg)
    return cfg


def test_a_resume_from_an_earlier_checkpoint_starts_a_new_branch(six_steps, tmp_path):
    """Back to step 2 with another lr (after a loss spike, say): steps 4 and 6 are this branch's, not the old
    ones kept as "the same step"; the old ones are moved aside, not lost. The branch equals the same resume made
    into a fresh directory."""
    run = six_steps.out_dir
    old_six = (checkpoint.step_dir(run, 6) / "state.pt").read_bytes()
    branch = replace(six_steps, resume=str(checkpoint.step_dir(run, 2)), allow_config_change=True,
                     optim=replace(six_steps.optim, lr=1e-2))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint.step_dir(run, 2), elsewhere / "step-0000002")
    train(branch)
    train(replace(branch, resume=str(elsewhere / "step-0000002"), out_dir=tmp_path / "fresh"))
    for step in (4, 6):
        assert lr_of(checkpoint.step_dir(run, step)) == 1e-2
        mine, fresh = (checkpoint.load(checkpoint.step_dir(d, step))["model"] for d in (run, tmp_path / "fresh"))
        assert all(torch.equal(mine[k], fresh[k]) for k in mine)
    (aside,) = (run / "checkpoints").glob("superseded-at-step-2-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004", "step-0000006"]
    assert (aside / "step-0000006" / "state.pt").read_bytes() == old_six
    assert checkpoint.verify(aside / "step-0000006") is None


def test_a_copy_of_a_checkpoint_named_anything_resumes_on_several_ranks(six_steps, tmp_path):
    """The ranks agree on the step the manifest records: the name of a copy says nothing (it read "step-N")."""
    backup = tmp_path / "my backup"
    shutil.copytree(checkpoint.step_dir(six_steps.out_dir, 4), backup)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:  # one process, as if one of two: the all-reduces run, the single rank agrees with itself
        agree_on_resume(backup, Dist(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), mode="ddp"))
    finally:
        dist.destroy_process_group()
    assert checkpoint.checkpoint_step(backup) == 4


def test_a_weights_only_checkpoint_is_refused_in_one_line(six_steps, tmp_path):
    """What hf_bridge.py import writes: the weights, no optimizer state."""
    state = checkpoint.load(checkpoint.step_dir(six_steps.out_dir, 2))
    del state["optimizer"]
    imported = tmp_path / "imported"
    checkpoint.save(imported, 0, state, keep=True, keep_last=0)
    with pytest.raises(UserError, match=r"step-0000000: holds weights only .* --init-from .*step-0000000 and a new"):
        train(replace(six_steps, out_dir=imported, resume="auto", max_steps=8))


def test_a_step_derived_seed_past_32_bits_is_reduced_into_range():
    """A resume on another number of ranks seeds from the step: 1_000_003 × step passes 2**32 at step 4295."""
    seed_everything(1_000_003 * 5000)
    drawn = np.random.random(3)
    seed_everything(1_000_003 * 5000 % 2**32)
    assert np.array_equal(np.random.random(3), drawn)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_no_rng_takes_is_one_line(seed):
    with pytest.raises(UserError, match=rf"seed \(--seed\) = {seed}: must be in \[0, 2\*\*32\)"):
        train_module.parse_config(["shakespeare-quick", "--seed", str(seed)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line():
    with pytest.raises(UserError, match=r"--device cuda: torch .* sees 0 GPU\(s\) here — use --device cpu"):
        pick_device("cuda")


def test_a_torn_last_metrics_row_is_dropped_and_a_bad_earlier_one_named(six_steps, capsys):
    metrics = six_steps.out_dir / "metrics.jsonl"
    rows = metrics.read_text()
    metrics.write_text(rows + '{"step": 7, "lo')  # an append cut short by a full disk or a crash
    train(replace(six_steps, resume="auto", max_steps=8))
    assert "metrics.jsonl:" in capsys.readouterr().out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))  # each training step once
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:3: not a metrics row"):
        train(replace(six_steps, resume="auto", max_steps=10))


def test_a_refused_run_leaves_no_directory_it_made_nor_a_lock(tiny_data, tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    with pytest.raises(UserError, match="data directory not found"):
        train(tiny_run(tmp_path / "no-data", deep))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="data directory not found"):
        train(tiny_run(tmp_path / "no-data", tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run's provenance")
def test_a_resume_with_other_cpu_numerics_says_it_is_not_bitwise(six_steps, capsys):
    """A CPU run's checkpoints name its CPU, torch's kernel set and thread count; resuming with another thread count
    (OMP_NUM_THREADS, a smaller container) is warned of, resuming as it was is not."""
    made = checkpoint.load(checkpoint.latest_complete(six_steps.out_dir))["provenance"]
    threads = torch.get_num_threads()
    assert (made["threads"], made["cpu_capability"]) == (threads, torch.backends.cpu.get_cpu_capability())
    capsys.readouterr()
    train(replace(six_steps, resume="auto", max_steps=8))
    assert "other numerics" not in capsys.readouterr().err
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    try:
        train(replace(six_steps, resume="auto", max_steps=10))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"with other numerics (threads {threads} → {other})" in err and "not bitwise" in err
