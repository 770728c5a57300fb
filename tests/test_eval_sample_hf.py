"""eval.py, sample.py, hf_bridge.py, plot.py against independent references: HF's GPT-2 and its loss, per-token
windowing, bytes counted from the source text, a second run, and the plotted lines against the rows written here."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import eval as gust_eval  # "eval" the module, not the builtin
import hf_bridge
import plot
import sample
from conftest import eval_on_two_ranks
from configs import DataConfig, PrepareConfig, TrainConfig, to_json
from data import load_tokenizer, prepare
from errors import UserError
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king queen night day love death sword crown speak hear thou thee my lord lady good sweet fair "
         "heaven earth fire blood gentle noble honest young old time grief joy tears heart hand eyes world "
         "señor café naïve ’tis любовь ἔρως").split()  # multi-byte UTF-8: bytes ≠ characters


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


def vocab_only_data_dir(root: Path, vocab_size: int = 300) -> str:
    """A data dir that holds only what import reads of it: meta.json's vocab_size (tiny_model's)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return str(root)


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
    assert first_loss == pytest.approx(hf_loss, rel=1e-5)  # fp32 sums in another order: relative, not absolute


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


def assert_bits_per_byte(bpb: float, nll: float, source: bytes, ids: list[int], tokenizer, rel: float = 1e-4):
    """bits/byte = the scored tokens' bits / the UTF-8 bytes they cover, both counted here. The first token is
    never scored, so its bytes are not covered: the divisor lies between the source's bytes and those less the
    longest token's. Any honest convention for that token lies in this bracket; its width (under 1% here) is far
    below the error of counting characters, tokens or nats instead of bytes and bits."""
    bits = nll / math.log(2)
    longest = max(len(tokenizer.id_to_token(i)) for i in set(ids))  # byte-level BPE: one character per byte
    assert bits / len(source) * (1 - rel) <= bpb <= bits / (len(source) - longest) * (1 + rel)
    # and the bracket can tell: counting characters would miss it by five times its width or more
    assert len(source) - len(source.decode()) > 5 * longest


@pytest.mark.parametrize("stride", [16, 6])
def test_eval_perplexity_matches_huggingface_token_by_token(tmp_path, ckpt, data_dir, text_file, stride):
    result = gust_eval.main(["--checkpoint", str(ckpt), "--text", str(text_file), "--context", "16",
                             "--stride", str(stride), "--batch-size", "3", "--device", "cpu"])
    ids = load_tokenizer(data_dir).encode(text_file.read_text()).ids
    assert len(ids) % stride != 0  # not a multiple of the stride: the last window is a short one
    hf_bridge.export_hf(ckpt, tmp_path)
    nll = per_token_reference(hf_from_pretrained(tmp_path), ids, context=16, stride=stride)
    assert result["tokens_scored"] == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert_bits_per_byte(result["bits_per_byte"], nll, text_file.read_bytes(), ids, load_tokenizer(data_dir))


def test_eval_on_a_whole_prepared_split_matches_huggingface_and_its_source_bytes(tmp_path, ckpt, data_dir):
    """The whole val split in disjoint windows: nats summed by HF window by window, bytes counted from the val
    documents' own files."""
    result = gust_eval.main(["--checkpoint", str(ckpt), "--device", "cpu"])  # context = stride = block size 32
    tokens = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    hf = hf_from_pretrained(hf_bridge.export_hf(ckpt, tmp_path))
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, len(tokens) - 1, 32):  # targets begin+1 .. begin+32: each scored once
            window = torch.from_numpy(tokens[begin:begin + 33])[None]
            logits = hf(window[:, :-1]).logits.double()
            nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    assert result["tokens_scored"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)
    val_docs = json.loads((data_dir / "meta.json").read_text())["val_documents"]
    source = b"".join(Path(name).read_bytes() for name in val_docs)
    assert_bits_per_byte(result["bits_per_byte"], nll, source, tokens.tolist(), load_tokenizer(data_dir), rel=1e-5)


def test_eval_of_an_hf_dir_matches_huggingface_loss(tmp_path, data_dir, text_file):
    """eval.py --hf-dir on a random HF GPT-2 with its own tokenizer.json, against HF's own tokenizer and
    labels= loss over the same disjoint windows."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-zero biases: a mis-mapped one would show
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())
    # context 31: a window is 32 tokens, which HF's labels= loss scores whole (it shifts the labels itself)
    result = gust_eval.main(["--hf-dir", str(tmp_path), "--text", str(text_file), "--context", "31", "--device", "cpu"])
    ids = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))(
        text_file.read_text())["input_ids"]
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 31):  # targets begin+1 .. begin+31: each scored once
            window = torch.tensor([ids[begin:begin + 32]])
            nll += hf(window, labels=window).loss.item() * (window.size(1) - 1)  # HF's mean over the window
    assert result["tokens_scored"] == len(ids) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_two_gloo_ranks_report_what_one_rank_does(tmp_path, ckpt, text_file):
    args = ["--checkpoint", str(ckpt), "--text", str(text_file), "--context", "16", "--stride", "8",
            "--batch-size", "2", "--device", "cpu"]
    one_rank = gust_eval.main(args)
    two_ranks = eval_on_two_ranks(args, tmp_path / "two.json")
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


def write_metrics(run: Path, with_attention_scores: bool, loss_offset: float) -> list[dict]:
    """A made-up metrics.jsonl, as train.py writes one, ending in a live run's half line; returns its rows."""
    rows = []
    for step in range(10, 210, 10):
        rows.append({"step": step, "loss": 8.0 * math.exp(-step / 100) + 2 + loss_offset, "lr": 6e-4 * min(1, step / 50),
                     "grad_norm": 1.0 / math.sqrt(step), "grad_norm_clipped": 0.1, "loss_scale": 2.0 ** (16 - step // 50),
                     "skipped_steps": 0, "tokens_per_sec": 3000.0})
        if step % 50 == 0:
            if with_attention_scores:
                rows[-1].update(act_norm=[1.0, 2.0], attn_max_score=[3.0 + step / 10, 5.0])
            rows.append({"step": step, "val_loss": rows[-1]["loss"] + 0.1, "val_bpb": 2.5 - step / 1000, "val_tokens": 4096})
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21')
    return rows


def plotted_figure(monkeypatch, argv: list[str]):
    """Run plot.py's CLI and keep the Figure it saves (the PNG is still written)."""
    from matplotlib.figure import Figure

    saved, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kw: (saved.append(fig), real_savefig(fig, *args, **kw)))
    plot.main(argv)
    assert len(saved) == 1
    return saved[0]


# (title fragment, metrics key, from eval rows?, log y): the panels plot.py promises in its docstring
EXPECTED_PANELS = [("train loss", "loss", False, False), ("val bits/byte", "val_bpb", True, False),
                   ("learning rate", "lr", False, False), ("gradient norm", "grad_norm", False, True),
                   ("loss scale", "loss_scale", False, True), ("attention score", "attn_max_score", False, True)]


def test_plot_draws_every_panel_with_every_runs_data(tmp_path, monkeypatch):
    """Each panel's title, y scale and lines against the rows written here: one line per run (the loss panel
    also a val line per run); a per-layer list is drawn as its max over layers."""
    pytest.importorskip("matplotlib")
    runs = {"a": write_metrics(tmp_path / "a", True, 0.0), "b": write_metrics(tmp_path / "b", False, 0.5)}
    fig = plotted_figure(monkeypatch, [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == len(EXPECTED_PANELS)
    for ax, (title, key, from_evals, log_y) in zip(axes, EXPECTED_PANELS):
        assert title in ax.get_title() and ax.get_yscale() == ("log" if log_y else "linear"), title
        expected = []
        for rows in runs.values():
            chosen = [r for r in rows if ("val_bpb" in r) == from_evals and key in r]
            expected.append(([r["step"] for r in chosen], [max(r[key]) if isinstance(r[key], list) else r[key]
                                                          for r in chosen]))
            if key == "loss":
                evals = [r for r in rows if "val_bpb" in r]
                expected.append(([r["step"] for r in evals], [r["val_loss"] for r in evals]))
        drawn = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
        assert drawn == expected, title


@pytest.mark.parametrize("out, message", [("curves", "name the picture with its file type"),
                                          ("curves.xyz", "name the picture with its file type"),
                                          ("missing/curves.png", "does not exist")])
def test_plot_refuses_an_out_it_cannot_write_as_named(tmp_path, out, message):
    """Found in review: `--out curves` wrote curves.png and printed "wrote curves"; an unknown type was a traceback."""
    pytest.importorskip("matplotlib")
    from plot import plot

    with pytest.raises(UserError, match=f"--out .*{message}"):
        plot([tmp_path], tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_eval_of_a_split_changed_where_the_fingerprint_did_not_look_is_one_line(tmp_path, data_dir, monkeypatch):
    """The split's start-up check reads ~1 MB of each file; a changed id elsewhere was an IndexError in the model."""
    import shutil

    import data

    changed = tmp_path / "data"
    shutil.copytree(data_dir, changed)
    tokens = np.fromfile(changed / "val.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = 400  # past the 300-token vocabulary
    tokens.tofile(changed / "val.bin")
    recorded = {shard["file"]: shard["fingerprint"] for split in json.loads((changed / "meta.json").read_text())[
        "splits"].values() for shard in split["shards"]}
    monkeypatch.setattr(data, "fingerprint", lambda path: recorded[Path(path).name])  # as if it looked elsewhere
    ckpt = save_checkpoint(tiny_model(both_fixes=True), tmp_path / "run", changed)
    with pytest.raises(UserError, match=r"val\.bin: token id 400 >= the model's vocab_size 300 — the file changed"):
        gust_eval.main(["--checkpoint", str(ckpt), "--device", "cpu"])


def test_plot_of_runs_without_rows_says_so(tmp_path):
    """Found in review: an empty metrics.jsonl drew five blank panels and exited 0."""
    pytest.importorskip("matplotlib")
    from plot import plot

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=r"run: no rows in metrics.jsonl yet — nothing to draw"):
        plot([tmp_path / "run"], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_plot_leaves_out_the_attention_panel_when_no_run_logged_it(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "b", False, 0.0)
    fig = plotted_figure(monkeypatch, [str(tmp_path / "b"), "--out", str(tmp_path / "b.png")])
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert len(titles) == 5 and all(title in got for (title, *_), got in zip(EXPECTED_PANELS[:5], titles))


# ----------------------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("flag,value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--max-examples", "-3"),
                                        ("--max-tokens", "-1"), ("--max-tokens", "1"), ("--context", "-8"),
                                        ("--stride", "-2")])
def test_eval_refuses_a_numeric_flag_that_cannot_work_before_loading(tmp_path, flag, value):
    # the run directory does not exist: a flag checked before loading is the error, not the missing checkpoint
    with pytest.raises(UserError, match=rf"^{flag} {value}: "):
        gust_eval.main(["--run-dir", str(tmp_path / "never-trained"), "--task", "lambada", "--file",
                        str(tmp_path / "lambada_test.jsonl"), flag, value])


@pytest.mark.parametrize("out", ["missing/results.json", "."])
def test_eval_refuses_an_out_it_cannot_write_before_scoring(tmp_path, out):
    with pytest.raises(UserError, match=r"^--out .*(does not exist|is a directory)"):
        gust_eval.main(["--run-dir", str(tmp_path / "never-trained"), "--out", str(tmp_path / out)])


def test_eval_writes_its_results_file_by_rename(tmp_path, ckpt, text_file, monkeypatch):
    """A reader (or a killed eval) sees the old results or the new, never half: the file is renamed into place."""
    out = tmp_path / "results.json"
    out.write_text('{"old": true}')
    renamed, os_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst)), os_replace(src, dst)))
    result = gust_eval.main(["--checkpoint", str(ckpt), "--text", str(text_file), "--device", "cpu", "--out", str(out)])
    assert renamed == [out] and json.loads(out.read_text()) == result
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]  # no temporary file left beside it


def test_import_refuses_a_directory_holding_a_run_and_leaves_it_as_it_was(tmp_path):
    hf_bridge.export_hf(tiny_model(both_fixes=False), tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"preset": "mine"}')
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n')
    with pytest.raises(UserError, match=r"^--out .*not empty"):
        hf_bridge.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(run),
                        "--data-dir", vocab_only_data_dir(tmp_path / "data")])
    assert sorted(path.name for path in run.iterdir()) == ["config.json", "metrics.jsonl"]
    assert (run / "config.json").read_text() == '{"preset": "mine"}'


def test_import_takes_the_run_directory_lock(tmp_path):
    import rundir

    hf_bridge.export_hf(tiny_model(both_fixes=False), tmp_path / "hf")
    run = tmp_path / "run"
    held = rundir.lock(run)  # another writer (flock: a second open file conflicts even in this process)
    try:
        with pytest.raises(UserError, match=r"in use by"):
            hf_bridge.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(run),
                        "--data-dir", vocab_only_data_dir(tmp_path / "data")])
    finally:
        held.close()
    assert [path.name for path in run.iterdir()] == [rundir.LOCK]
    hf_bridge.main(["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(run),
                        "--data-dir", vocab_only_data_dir(tmp_path / "data")])  # lock free: it imports
    assert checkpoint.latest_complete(run) is not None


def test_export_checks_the_data_dir_and_out_before_creating_anything(tmp_path, ckpt):
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=r"data directory not found"):
        hf_bridge.main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--data-dir", str(tmp_path / "none")])
    assert not out.exists()
    run = ckpt.parent.parent  # a run directory: export would replace nothing of it
    with pytest.raises(UserError, match=r"^--out .*holds a gust run"):
        hf_bridge.main(["export", "--checkpoint", str(ckpt), "--out", str(run)])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"^--out .*a_file/hf: a file is in the way"):  # was NotADirectoryError
        hf_bridge.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a_file" / "hf")])
    with pytest.raises(UserError, match=r"a run directory, not a checkpoint"):  # was "no MANIFEST.json"
        hf_bridge.main(["export", "--checkpoint", str(run), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--top-k", "0"), ("--top-k", "-3"), ("--temperature", "0"),
                                        ("--temperature", "-0.5"), ("--max-new-tokens", "0"),
                                        ("--max-new-tokens", "-1"), ("--num-samples", "0")])
def test_sample_refuses_a_flag_that_cannot_work_before_loading(tmp_path, flag, value):
    with pytest.raises(UserError, match=rf"^{flag} {value}"):
        sample.main(["--run-dir", str(tmp_path / "never-trained"), flag, value])


# ----------------------------------------------------------------------------- found in review (2026-12-07)

@pytest.mark.parametrize("edit,says", [
    ({"n_embd": 64}, r"weights do not fit config.json \(transformer\.\S+ is \(\d+,?\d*\), config.json's shape"),
    ({"n_positions": 64}, r"weights do not fit config.json \(transformer.wpe.weight is \(32, 32\)"),
    ({"n_head": 3}, r"config.json: n_embd 32 is not divisible by n_head 3"),
    ({"n_layer": "2"}, r"config.json: n_layer = '2' is not a positive integer"),
    ("{not json", r"config.json: not valid JSON"),
])
def test_an_hf_config_that_does_not_fit_is_one_line_naming_it(tmp_path, edit, says):
    hf_bridge.export_hf(tiny_model(both_fixes=False), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(edit if isinstance(edit, str) else json.dumps(config | edit))
    with pytest.raises(UserError, match=says):
        hf_bridge.import_hf(tmp_path / "hf")


def test_export_leaves_another_models_directory_alone_and_replaces_its_own(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    (other / "model.safetensors").write_bytes(b"someone else's weights")
    with pytest.raises(UserError, match=r"--out .*other: not empty, and no earlier gust export"):
        hf_bridge.export_hf(tiny_model(both_fixes=False), other)
    assert (other / "model.safetensors").read_bytes() == b"someone else's weights"
    ours = tmp_path / "ours"
    hf_bridge.export_hf(tiny_model(both_fixes=False), ours)
    (ours / "vocab.json").write_text("{}")  # an earlier export's tokenizer of another kind
    hf_bridge.export_hf(tiny_model(both_fixes=True), ours)  # replaced: its own earlier export
    assert not (ours / "vocab.json").exists()
    assert json.loads((ours / "config.json").read_text())["scale_attn_by_inverse_layer_idx"] is True


def test_import_checks_that_the_data_dirs_tokenizer_fits_the_model(tmp_path):
    hf_bridge.export_hf(tiny_model(both_fixes=False), tmp_path / "hf")
    args = ["import", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    with pytest.raises(UserError, match=r"data directory not found"):
        hf_bridge.main([*args, "--data-dir", str(tmp_path / "none")])
    with pytest.raises(UserError, match=r"--data-dir .*: its tokenizer has 4096 tokens, the model 300"):
        hf_bridge.main([*args, "--data-dir", vocab_only_data_dir(tmp_path / "big", 4096)])
    assert not (tmp_path / "run").exists()


def test_eval_refuses_text_it_cannot_read_instead_of_scoring_the_rest(tmp_path, ckpt, text_file):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    out = tmp_path / "results.json"
    with pytest.raises(UserError, match=r"^--text: .*bad.txt: not UTF-8 .* every file named is scored, or none"):
        gust_eval.main(["--checkpoint", str(ckpt), "--text", str(text_file), str(tmp_path / "bad.txt"),
                        "--device", "cpu", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("flags,says", [
    (["--max-examples", "5"], r"--max-examples 5: a flag of hellaswag's and lambada's scoring, not of perplexity"),
    (["--task", "lambada", "--file", "x.jsonl", "--max-tokens", "5"], r"--max-tokens 5: a flag of perplexity's"),
    (["--task", "hellaswag", "--file", "x.jsonl", "--context", "16"], r"--context 16: a flag of perplexity's and "
                                                                        r"wikitext's scoring, not of hellaswag"),
])
def test_eval_refuses_a_flag_that_would_be_ignored(tmp_path, flags, says):
    with pytest.raises(UserError, match=says):
        gust_eval.main(["--run-dir", str(tmp_path / "never-trained"), *flags])


def test_eval_of_a_prefix_divides_by_the_prefix_bytes_and_records_the_model(tmp_path, ckpt, data_dir, text_file):
    """--max-tokens: the bits of the scored tokens over their own bytes (found in review: the whole source's bytes
    per token, 3% off there); the bytes counted here as those of the text the scored tokens cover, by the offsets
    the tokenizer gives into it."""
    result = gust_eval.main(["--checkpoint", str(ckpt), "--text", str(text_file), "--max-tokens", "40",
                             "--device", "cpu"])
    text = text_file.read_text()
    offsets = load_tokenizer(data_dir).encode(text).offsets  # (start, end) characters of each token
    scored_bytes = len(text[offsets[1][0]:offsets[39][1]].encode())  # tokens 1..39: all but the first
    bits = result["loss"] * result["tokens_scored"] / math.log(2)
    assert result["tokens_scored"] == 39 and result["bits_per_byte"] == pytest.approx(bits / scored_bytes, rel=1e-9)
    assert result["model"]["checkpoint"] == str(ckpt) and result["model"]["step"] == 7


def test_a_missing_checkpoint_or_a_prompt_of_no_text_is_one_line(tmp_path, ckpt):
    with pytest.raises(UserError, match=r"^--checkpoint .*nowhere: no such directory"):
        sample.main(["--checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"^--prompt: not UTF-8 text"):
        sample.main(["--checkpoint", str(ckpt), "--prompt", b"\xff\xfe bad".decode("utf-8", "surrogateescape"),
                     "--device", "cpu"])
