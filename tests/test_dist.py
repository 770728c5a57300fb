"""--dist ddp / zero1 / fsdp under torchrun on CPU (gloo): same training, one checkpoint layout any world size resumes."""
import shutil
from dataclasses import replace

import pytest
import torch

from configs import CheckpointConfig
from conftest import tiny_run
from test_train import assert_states_equal, cli_args, final_state, torchrun, train_losses
from train import train


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """Uninterrupted 2-rank, 10-step fp32 runs under each --dist, from the same seed and data."""
    root = tmp_path_factory.mktemp("dist")
    for mode in ("ddp", "zero1", "fsdp"):
        cfg = tiny_run(tiny_data, root / mode, dist=mode,  # checkpoints at 0 (no optimizer state yet), 5, 10
                       checkpoint=CheckpointConfig(schedule="mistral", intervals=((5, 10),), keep_last=0))
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
