"""train.py's bf16, --compile and --deterministic modes on CPU, each against a plain fp32 run of the same seed."""
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import tiny_run
from test_train import assert_states_equal, final_state, train_losses
from train import train

SHORT = dict(max_steps=6, final_eval_batches=4)  # 6 steps, evals at 5 and 6: enough to see drift, seconds to run


@pytest.fixture(scope="module")
def fp32_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("modes") / "fp32"
    return run, train(tiny_run(tiny_data, run, **SHORT))


def test_bf16_run_stays_close_to_fp32_and_is_really_bf16(fp32_run, tiny_data, tmp_path):
    run, fp32_result = fp32_run
    bf16_result = train(tiny_run(tiny_data, tmp_path / "bf16", precision="bf16", **SHORT))
    fp32, bf16 = train_losses(run), train_losses(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() and all(math.isfinite(loss) for loss in bf16.values())
    # 0.01 nats: bf16 keeps 8 significant bits (0.4% per rounding), but the loss is summed in fp32 over
    # 128 tokens and the logits of a tiny model are small; the largest difference measured here is 7e-5
    assert max(abs(bf16[s] - fp32[s]) for s in fp32) < 0.01
    assert abs(bf16_result["val_loss"] - fp32_result["val_loss"]) < 0.01
    assert any(bf16[s] != fp32[s] for s in fp32)  # bf16 really ran: fp32 would repeat the numbers bitwise
    assert final_state(tmp_path / "bf16")["scaler"]["scale"] == 1.0  # bf16 bypasses the loss scaler


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_compiled_run_equals_the_eager_run(tiny_data, tmp_path, monkeypatch):
    """torch.compile (inductor, C++ on CPU) reorders float sums, nothing more: losses within 1e-5.
    The slow test of the suite: ~40 s of CPU for the first compile, a few seconds once inductor's on-disk
    cache holds it."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # a worker pool costs 2.5× the CPU on 2 cores
    cfg = tiny_run(tiny_data, tmp_path / "eager", max_steps=3, final_eval_batches=2,
                   diag_interval=0)  # no diagnostics step: it would be a second graph to compile
    eager_result = train(cfg)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled_result = train(replace(cfg, out_dir=tmp_path / "compiled", compile=True))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the loop really ran a compiled model
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 3
    assert all(abs(eager[s] - compiled[s]) < 1e-5 for s in eager)
    assert abs(eager_result["val_loss"] - compiled_result["val_loss"]) < 1e-5
    # the checkpoint holds the plain model's names (no torch.compile "_orig_mod." prefix): any run can load it
    assert final_state(tmp_path / "compiled")["model"].keys() == final_state(tmp_path / "eager")["model"].keys()


@pytest.fixture
def restores_determinism():
    """--deterministic switches torch's process-wide setting on; give the next tests the process as it was."""
    before, env_before = torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before)
    if env_before is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env_before


def test_deterministic_runs_are_bitwise_equal_to_each_other_and_to_the_default(fp32_run, tiny_data, tmp_path,
                                                                                restores_determinism):
    """On CPU torch's kernels are already deterministic: the flag must switch the checks on without changing
    a single bit (on GPU it also pins cuBLAS's workspace, which this machine cannot show)."""
    run, _ = fp32_run
    for name in ("a", "b"):
        torch.use_deterministic_algorithms(False)
        train(tiny_run(tiny_data, tmp_path / name, deterministic=True, **SHORT))
        assert torch.are_deterministic_algorithms_enabled()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b") == train_losses(run)
    assert_states_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    assert_states_equal(final_state(tmp_path / "a"), final_state(run))
