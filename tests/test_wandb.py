"""wandb from the run's side, with a stand-in module (no network, no account): every logged number reaches it,
per-layer lists included, and a start it refuses is one line before the run writes anything."""
import json
import sys
import types

import pytest

from conftest import tiny_run
from errors import UserError
from train import train


def stand_in_wandb(monkeypatch, init) -> None:
    """sys.modules["wandb"] replaced by a module whose init is `init` and whose errors are wandb's two names."""
    module, errors = types.ModuleType("wandb"), types.ModuleType("wandb.errors")
    errors.UsageError = type("UsageError", (Exception,), {})
    errors.AuthenticationError = type("AuthenticationError", (Exception,), {})
    module.errors, module.init = errors, init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setitem(sys.modules, "wandb.errors", errors)


def test_every_logged_number_reaches_wandb_per_layer_lists_included(tiny_data, tmp_path, monkeypatch):
    sent = []

    class Run:
        def log(self, values, step):
            sent.append((step, values))

        def finish(self):
            sent.append("finished")

    stand_in_wandb(monkeypatch, lambda **kwargs: Run())
    train(tiny_run(tiny_data, tmp_path / "run", wandb_mode="offline"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sent[-1] == "finished" and len(sent) == len(rows) + 1
    for (step, values), row in zip(sent, rows):
        assert step == row["step"] and not any(isinstance(v, list) for v in values.values())
        assert all(values[key] == value for key, value in row.items() if not isinstance(value, list))
        for key in ("act_norm", "attn_max_score"):  # the per-layer diagnostics: one chart per layer
            if key in row:
                assert [values[f"{key}/{layer}"] for layer in range(2)] == row[key]
    assert sum("attn_max_score/1" in values for _, values in sent[:-1]) == 2  # steps 5 and 10


def test_a_start_wandb_refuses_is_one_line_and_nothing_is_written(tiny_data, tmp_path, monkeypatch):
    def init(**kwargs):
        raise sys.modules["wandb"].errors.UsageError("No API key configured. Use `wandb login` to log in.")

    stand_in_wandb(monkeypatch, init)
    with pytest.raises(UserError, match=r"^--wandb-mode online: wandb cannot start \(No API key configured"):
        train(tiny_run(tiny_data, tmp_path / "run", wandb_mode="online"))
    assert not (tmp_path / "run").exists()  # no config.json, no metrics.jsonl: the refused run leaves nothing


def test_without_wandb_the_run_warns_and_logs_to_metrics_jsonl(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.warns(UserWarning, match="wandb is not installed; logging to metrics.jsonl only"):
        train(tiny_run(tiny_data, tmp_path / "run", wandb_mode="offline"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") > 10
