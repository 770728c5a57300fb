"""--compile under 2-rank DDP (gloo, CPU): distribute() wraps DDP first and compiles after, as torch documents,
and the run's losses match an uncompiled run of the same batches (1 rank × accumulation 2)."""
from dataclasses import replace

from configs import CheckpointConfig
from conftest import tiny_run
from test_train import cli_args, torchrun, train_losses
from train import train


def test_two_rank_ddp_compiled_matches_uncompiled(tiny_data, tmp_path):
    base = tiny_run(tiny_data, tmp_path / "eager", max_steps=3, eval_interval=10**6, eval_batches=1,
                    final_eval_batches=1, diag_interval=0, checkpoint=CheckpointConfig(schedule="none", keep_last=1))
    train(base)  # one process, accumulation 2: the same global batches as 2 ranks × 1
    proc = torchrun("train.py", *cli_args(replace(base, out_dir=tmp_path / "compiled", compile=True)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 3
    assert all(abs(eager[s] - compiled[s]) < 1e-4 for s in eager), (eager, compiled)
