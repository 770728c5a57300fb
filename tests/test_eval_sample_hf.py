"""eval.py, sample.py, hf_bridge.py, plot.py against independent references: HF's GPT-2, per-token windowing, a second run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import eval as gust_eval  # "eval" the module, not the builtin
import hf_bridge
import plot
import sample
from configs import DataConfig, PrepareConfig, TrainConfig
from data import load_tokenizer, prepare
from model import GPT, GPTConfig
from configs import to_json

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king queen night day love death sword crown speak hear thou thee my lord lady good sweet fair "
         "heaven earth fire blood gentle noble honest young old time grief joy tears heart hand eyes world").split()


def random_text(rng: np.random.Generator, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        words = rng.choice(WORDS, size=rng.integers(4, 10))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", ";", "!", "?"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data dir with a 300-token BPE trained on made-up verse."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / f"doc{i}.txt").write_text(random_text(rng, 60))
    out = root / "prepared"
    prepare(PrepareConfig(inputs=(root,), out_dir=out, tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.25))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Text none of the tokenizer's training documents contain; its length is not a multiple of any stride used."""
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(random_text(np.random.default_rng(1), 25))
    return path


def tiny_model(both_fixes: bool, bias: bool = True) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=bias,
                          attn_impl="naive", upcast_attn=both_fixes, scale_attn_by_layer_idx=both_fixes))
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases and LayerNorm shifts: a mis-mapped one would show
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_checkpoint(model: GPT, run_dir: Path, data_dir: Path) -> Path:
    cfg = TrainConfig(model=model.config, data=DataConfig(dir=data_dir), out_dir=run_dir)
    return checkpoint.save(run_dir, 7, {"model": model.state_dict(), "config": to_json(cfg), "step": 7},
                           keep=True, keep_last=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir) -> Path:
    return save_checkpoint(tiny_model(both_fixes=True), tmp_path_factory.mktemp("run"), data_dir)


def hf_from_pretrained(hf_dir: Path):
    transformers = pytest.importorskip("transformers")
    # eager: the only HF attention path that honours reorder_and_upcast_attn
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()


# ----------------------------------------------------------------------------- hf_bridge

@pytest.mark.parametrize("both_fixes,bias", [(False, True), (True, True), (True, False)])
def test_export_loads_in_huggingface_with_equal_logits(tmp_path, data_dir, both_fixes, bias):
    model = tiny_model(both_fixes, bias)
    hf_bridge.export_hf(model, tmp_path, data_dir)
    hf = hf_from_pretrained(tmp_path)
    assert hf.config.reorder_and_upcast_attn == hf.config.scale_attn_by_inverse_layer_idx == both_fixes
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5


def test_export_ships_a_tokenizer_huggingface_reads_identically(tmp_path, ckpt, data_dir, text_file):
    transformers = pytest.importorskip("transformers")
    hf_bridge.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path)])  # data dir: the checkpoint's own
    text = text_file.read_text()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert theirs == load_tokenizer(data_dir).encode(text).ids
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 0  # <|endoftext|> of the BPE


@pytest.mark.parametrize("both_fixes", [False, True])
def test_import_of_a_random_huggingface_gpt2_matches_its_logits(tmp_path, data_dir, both_fixes):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     reorder_and_upcast_attn=both_fixes, scale_attn_by_inverse_layer_idx=both_fixes)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    run = tmp_path / "imported"
    hf_bridge.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(run), "--data-dir", str(data_dir)])
    from_dir = hf_bridge.import_hf(tmp_path / "hf")
    from_run, _ = gust_eval.load_gust(checkpoint.latest_complete(run))
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        for model in (from_dir, from_run):
            assert (model(idx)[0] - expected).abs().max().item() < 1e-5


def test_fine_tuning_starts_from_imported_huggingface_weights(tmp_path, data_dir):
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_run
    from data import TokenSplit
    from train import train

    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    hf_bridge.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"),
                    "--data-dir", str(data_dir)])
    cfg = tiny_run(data_dir, tmp_path / "tuned", init_from=tmp_path / "imported", max_steps=1, global_batch_size=4,
                   micro_batch_size=4, model=GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32))
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(row["loss"] for row in rows if "loss" in row)  # before the first update
    split = TokenSplit(data_dir, "train", 32, 300, True)
    x, y = split.windows(split.sample_starts(cfg.seed, 0, 4))  # step 0's batch: a pure function of (seed, step)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(first_loss - hf_loss) < 1e-5


# ----------------------------------------------------------------------------- eval

@pytest.mark.parametrize("n_tokens,context,stride", [(2, 8, 8), (101, 16, 16), (101, 16, 5), (100, 16, 8), (17, 16, 4)])
def test_windows_score_every_token_after_the_first_exactly_once(n_tokens, context, stride):
    times_scored = np.zeros(n_tokens, dtype=int)
    for begin, end, n_scored in gust_eval.score_windows(n_tokens, context, stride):
        assert end - begin <= context + 1 and 1 <= n_scored <= end - begin - 1
        times_scored[end - n_scored:end] += 1
        if begin > 0:  # after the first window each scored token sees at least context - stride earlier tokens
            assert end - n_scored - begin >= context - stride
    assert times_scored[0] == 0 and (times_scored[1:] == 1).all()


def per_token_reference(hf, ids: list[int], context: int, stride: int) -> float:
    """Summed NLL, one forward per token: target t sees ids[s:t], s the first window start with s + context ≥ t.

    HF stays fp32 (its upcast path insists on it); the sum is a Python float (fp64).
    """
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = max(0, math.ceil((t - context) / stride)) * stride
            logits = hf(torch.tensor([ids[start:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
    return nll


@pytest.mark.parametrize("stride", [16, 6])
def test_eval_perplexity_matches_huggingface_token_by_token(tmp_path, ckpt, data_dir, text_file, stride):
    result = gust_eval.main(["--checkpoint", str(ckpt), "--text", str(text_file), "--context", "16",
                             "--stride", str(stride), "--batch-size", "3", "--device", "cpu"])
    ids = load_tokenizer(data_dir).encode(text_file.read_text()).ids
    assert len(ids) % stride != 0  # not a multiple of the stride: the last window is a short one
    hf_bridge.export_hf(ckpt, tmp_path)
    nll = per_token_reference(hf_from_pretrained(tmp_path), ids, context=16, stride=stride)
    n_bytes = len(text_file.read_text().encode("utf-8"))
    assert result["tokens_scored"] == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / (n_bytes * (len(ids) - 1) / len(ids)), rel=1e-4)


def test_eval_on_a_prepared_split_matches_train_py_val_bpb(ckpt, data_dir):
    """Disjoint full windows of the val split: train.py's evaluate() numbers, recomputed with model(x, y)."""
    from data import TokenSplit

    split = TokenSplit(data_dir, "val", 32, 300)
    n_windows = min(split.n_windows, 6)
    result = gust_eval.main(["--checkpoint", str(ckpt), "--max-tokens", str(32 * n_windows + 1), "--device", "cpu"])
    model, _ = gust_eval.load_gust(ckpt)
    with torch.no_grad():
        x, y = split.windows(split.eval_starts(n_windows))
        loss = model(x, y)[1].item()
    assert result["tokens_scored"] == 32 * n_windows
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) * len(split.tokens) / split.bytes, rel=1e-5)


def test_two_gloo_ranks_report_what_one_rank_does(tmp_path, ckpt, text_file):
    args = ["--checkpoint", str(ckpt), "--text", str(text_file), "--context", "16", "--stride", "8",
            "--batch-size", "2", "--device", "cpu"]
    one_rank = gust_eval.main(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", *args, "--json-out", str(tmp_path / "two.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two_ranks = json.loads((tmp_path / "two.json").read_text())
    assert two_ranks["tokens_scored"] == one_rank["tokens_scored"]
    assert two_ranks["loss"] == pytest.approx(one_rank["loss"], rel=1e-6)
    assert two_ranks["bits_per_byte"] == pytest.approx(one_rank["bits_per_byte"], rel=1e-6)


# ----------------------------------------------------------------------------- sample, plot

def test_sample_prints_the_same_text_for_the_same_seed(ckpt, capsys):
    args = ["--checkpoint", str(ckpt), "--prompt", "The king", "--num-samples", "2", "--max-new-tokens", "20",
            "--device", "cpu"]
    printed = []
    for seed in ("7", "7", "8"):
        sample.main([*args, "--seed", seed])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].startswith("The king")
    assert printed[0] != printed[2]


def test_sample_without_a_checkpoint_says_train_first(tmp_path):
    with pytest.raises(ValueError, match=r"no complete checkpoint — train first with `make train`"):
        sample.main(["--run-dir", str(tmp_path / "never-trained")])


def test_plot_writes_a_png_with_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for step in range(10, 210, 10):
        rows.append({"step": step, "loss": 8.0 * math.exp(-step / 100) + 2, "lr": 6e-4 * min(1, step / 50),
                     "grad_norm": 1.0 / math.sqrt(step), "grad_norm_clipped": 0.1, "loss_scale": 2.0 ** (16 - step // 50),
                     "skipped_steps": 0, "tokens_per_sec": 3000.0})
        if step % 50 == 0:
            rows[-1].update(act_norm=[1.0, 2.0], attn_max_score=[3.0 + step / 10, 5.0])
            rows.append({"step": step, "val_loss": rows[-1]["loss"] + 0.1, "val_bpb": 2.5 - step / 1000, "val_tokens": 4096})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21')  # a live run's half line
    plot.main([str(run), "--out", str(tmp_path / "curves.png")])
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
