"""One way errors reach the user, in every entry point: bad input is one line and exit status 2; a bug keeps its
whole traceback. Also the one-line refusals of untrusted files (a pickled Hugging Face checkpoint)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_bridge
from conftest import ROOT, tiny_run
from configs import to_json
from errors import UserError


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.parametrize("argv, names", [
    (["train.py", "nowhere/config.json"], "nowhere/config.json: no such config file"),
    (["eval.py", "--run-dir", "nowhere", "--device", "cpu"], "nowhere: no complete checkpoint"),
    (["sample.py", "--run-dir", "nowhere", "--device", "cpu"], "nowhere: no complete checkpoint"),
    (["hf_bridge.py", "export", "--checkpoint", "nowhere", "--out", "hf-out"], "--checkpoint nowhere: no such directory"),
    (["plot.py", "nowhere", "--out", "p.png"], "nowhere/metrics.jsonl: not found"),
])
def test_every_entry_point_reports_bad_input_in_one_line_with_exit_2(tmp_path, argv, names):
    result = run_script(str(ROOT / argv[0]), *argv[1:], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gust: error: ") and names in lines[0], result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


BUG = """import runpy, sys
import model
def broken_forward(self, *args, **kwargs):
    raise RuntimeError("injected bug: out of memory in the forward")
model.GPT.forward = broken_forward
sys.argv = ["train.py", sys.argv[1]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_an_unexpected_error_in_train_keeps_its_traceback(tiny_data, tmp_path):
    """RuntimeError and OSError used to be caught and printed as one line, losing the stack of an OOM or NCCL failure."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_json(tiny_run(tiny_data, tmp_path / "run"))))
    result = run_script("-c", BUG, str(config))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "in broken_forward" in result.stderr
    assert "RuntimeError: injected bug" in result.stderr and "gust: error" not in result.stderr


class NotATensor:
    pass


def test_a_pickled_huggingface_checkpoint_is_refused_in_one_line(tmp_path):
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin: refused by torch.load\(weights_only=True\) — it holds "
                                        r"pickled objects \(.*NotATensor\)") as err:
        hf_bridge.read_hf_weights(Path(tmp_path))
    assert "\n" not in str(err.value)
