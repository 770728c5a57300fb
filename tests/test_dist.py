"""--dist ddp / zero1 / fsdp (with and without resharding after forward) under torchrun on CPU (gloo): same training
as ddp, one checkpoint layout any world size resumes."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from configs import CheckpointConfig, GPTConfig
from conftest import tiny_run
from model import GPT
from test_train import assert_states_equal, cli_args, final_state, torchrun, train_losses
from train import train


PEAK_FLOPS = 1e12


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """Uninterrupted 2-rank, 10-step fp32 runs under each --dist, from the same seed and data."""
    root = tmp_path_factory.mktemp("dist")
    for mode in ("ddp", "zero1", "fsdp"):
        cfg = tiny_run(tiny_data, root / mode, dist=mode,  # checkpoints at 0 (no optimizer state yet), 5, 10
                       checkpoint=CheckpointConfig(schedule="mistral", intervals=((5, 10),), keep_last=0),
                       peak_flops=PEAK_FLOPS)  # a made-up peak per device, for the MFU rows
        proc = torchrun("train.py", *cli_args(cfg), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_zero1_and_fsdp_train_as_ddp(straight):
    ddp = final_state(straight / "ddp")
    for mode in ("zero1", "fsdp"):
        losses, ddp_losses = train_losses(straight / mode), train_losses(straight / "ddp")
        assert losses.keys() == ddp_losses.keys() and len(losses) == 10
        assert all(abs(losses[s] - ddp_losses[s]) < 1e-6 for s in losses), mode
        sharded = final_state(straight / mode)
        assert sharded["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]  # plain AdamW's layout
        assert sharded["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
        for name, weight in ddp["model"].items():
            other = sharded["model"][name]
            if name.endswith("c_attn.bias"):  # the key bias's true gradient is 0 (softmax ignores a per-row
                C = weight.numel() // 3       # shift), so its rounding noise, normalised by AdamW, is all it learns
                weight, other = torch.cat([weight[:C], weight[2 * C:]]), torch.cat([other[:C], other[2 * C:]])
            assert torch.allclose(weight, other, rtol=0, atol=1e-6), (mode, name)


def test_mfu_on_two_ranks_is_over_both_devices_peaks(straight):
    # MFU = the run's model FLOP/s over the peak of its 2 devices; the FLOPs per token written out here: 6 per weight
    # that multiplies (tied weights once; the position table is a lookup), 12·L·C·T for the attention (PaLM, app. B)
    cfg = json.loads((straight / "ddp" / "config.json").read_text())["model"]
    config = GPTConfig(**cfg)
    padding = (config.padded_vocab_size - config.vocab_size) * config.n_embd  # rows no token uses: not the model's
    weights = sum(p.numel() for name, p in GPT(config).named_parameters() if "wpe" not in name) - padding
    flops_token = 6 * weights + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]
    rows = [json.loads(line) for line in (straight / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "tokens_per_sec" in row]
    assert rows and all(row["mfu"] == pytest.approx(row["tokens_per_sec"] * flops_token / (2 * PEAK_FLOPS))
                        for row in rows)


def assert_trains_as_ddp(run_dir, ddp_dir, label):
    """Losses within 1e-6 of ddp at every step, final weights within 1e-6 (the tolerance of the test above)."""
    losses, ddp_losses = train_losses(run_dir), train_losses(ddp_dir)
    assert losses.keys() == ddp_losses.keys() and len(losses) == 10
    assert all(abs(losses[s] - ddp_losses[s]) < 1e-6 for s in losses), label
    ddp, other_state = final_state(ddp_dir)["model"], final_state(run_dir)["model"]
    for name, weight in ddp.items():
        other = other_state[name]
        if name.endswith("c_attn.bias"):  # the key bias: see test_zero1_and_fsdp_train_as_ddp
            C = weight.numel() // 3
            weight, other = torch.cat([weight[:C], weight[2 * C:]]), torch.cat([other[:C], other[2 * C:]])
        assert torch.allclose(weight, other, rtol=0, atol=1e-6), (label, name)


def test_fsdp_without_resharding_after_forward_trains_as_ddp(straight, tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "keep", dist="fsdp", fsdp_reshard_after_forward=False,
                   checkpoint=CheckpointConfig(schedule="mistral", intervals=((5, 10),), keep_last=0))
    proc = torchrun("train.py", *cli_args(cfg), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trains_as_ddp(tmp_path / "keep", straight / "ddp", "fsdp, no reshard")


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_reshard_flag_decides_whether_weights_stay_gathered_after_forward(tiny_data, tmp_path, reshard):
    """What the flag is for, seen in one gloo process: after a forward, a block's weights are shards again
    (DTensors) with resharding, and whole plain tensors without it, until backward."""
    from torch.distributed.tensor import DTensor

    from model import GPT
    from distributed import Dist, distribute

    cfg = tiny_run(tiny_data, tmp_path, dist="fsdp", fsdp_reshard_after_forward=reshard)
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        raw_model = GPT(cfg.model)
        model = distribute(raw_model, cfg, Dist(0, 0, 1, torch.device("cpu"), "fsdp"))
        idx = torch.zeros(2, cfg.model.block_size, dtype=torch.long)
        loss = model(idx, idx)[1]
        assert isinstance(raw_model.transformer.h[0].attn.c_attn.weight, DTensor) == reshard
        loss.backward()
        assert isinstance(raw_model.transformer.h[0].attn.c_attn.weight, DTensor)  # resharded after backward
    finally:
        torch.distributed.destroy_process_group()


def test_zero1_checkpoint_resumes_on_two_ranks_bitwise_and_on_one_rank_or_under_fsdp(straight, tiny_data, tmp_path):
    base = tiny_run(tiny_data, tmp_path / "resumed", dist="zero1")
    for run in ("resumed", "one_rank", "fsdp"):  # the straight run as if stopped after its step-5 checkpoint
        shutil.copytree(straight / "zero1", tmp_path / run)
        shutil.rmtree(tmp_path / run / "checkpoints" / "step-0000010")

    proc = torchrun("train.py", *cli_args(replace(base, resume="auto")), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "resumed") == train_losses(straight / "zero1")
    assert_states_equal(final_state(tmp_path / "resumed"), final_state(straight / "zero1"))

    # a new world size: 1 rank × 2 micro-steps, or 2 fsdp ranks, sees the same batches; only sums are reordered
    train(replace(base, out_dir=tmp_path / "one_rank", resume="auto"))  # in this process: one rank
    proc = torchrun("train.py", *cli_args(replace(base, out_dir=tmp_path / "fsdp", dist="fsdp", resume="auto")),
                    timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = train_losses(straight / "zero1")
    for run in ("one_rank", "fsdp"):
        losses = train_losses(tmp_path / run)
        assert losses.keys() == expected.keys() and all(abs(losses[s] - expected[s]) < 1e-5 for s in losses), run
        assert final_state(tmp_path / run)["step"] == 10
