"""data.py prepare's inputs as a user gives them: a file named twice, a BOM, a quoted glob, a damaged vocab.json or
meta.json in the way, a directory holding files of its own — one line each, and nothing of theirs touched."""
import json
import subprocess
import sys

import numpy as np
import pytest

import data
import tokenizer
from conftest import GPT2_VOCAB, ROOT
from data import TokenSplit, prepare
from errors import UserError
from test_data_stream import all_tokens, gpt2_cfg, write_corpus

pytestmark = pytest.mark.skipif(not GPT2_VOCAB.is_dir(), reason="GPT-2 vocabulary missing: run `make setup`")


@pytest.mark.parametrize("how", ["same name", "directory and a file in it", "glob and a file it matches"])
def test_a_file_named_twice_is_refused_before_anything_is_written(tmp_path, how):
    """Read twice, its documents would land in train and in val: the val loss would measure memorisation."""
    write_corpus(tmp_path / "src" / "sub", n_docs=20)
    doc = tmp_path / "src" / "sub" / "docs.jsonl"
    first = {"same name": doc, "directory and a file in it": tmp_path / "src",
             "glob and a file it matches": str(tmp_path / "src" / "*")}[how]
    with pytest.raises(UserError, match=r"--inputs: .*docs.jsonl is named twice"):
        prepare(gpt2_cfg([first, doc], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_quoted_glob_reads_what_the_shells_expansion_reads(tmp_path):
    """'src/*' matches the directory src/sub: searched, as `--inputs src/*` unquoted (the shell's expansion) is."""
    write_corpus(tmp_path / "src" / "sub", n_docs=30)
    prepare(gpt2_cfg([str(tmp_path / "src" / "*")], tmp_path / "quoted"))
    prepare(gpt2_cfg([tmp_path / "src" / "sub"], tmp_path / "expanded"))
    for split in ("train", "val"):
        assert np.array_equal(all_tokens(tmp_path / "quoted", split), all_tokens(tmp_path / "expanded", split))
    prepare(gpt2_cfg([str(tmp_path / "src" / "**")], tmp_path / "recursive"))  # matches the file and its directory
    assert json.loads((tmp_path / "recursive" / "meta.json").read_text())["splits"]["train"]["documents"] == \
        json.loads((tmp_path / "expanded" / "meta.json").read_text())["splits"]["train"]["documents"]


def test_a_bom_is_not_text(tmp_path):
    """A .txt saved by Notepad starts with U+FEFF: the same tokens as without it (as in .jsonl); a file of only a BOM
    is empty."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name, text in (("1.txt", "Hello there,\r\nfriend.\n"), ("2.txt", "A second play.\n")):
        (tmp_path / "a" / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        (tmp_path / "b" / name).write_bytes(text.encode())
    (tmp_path / "a" / "3.txt").write_bytes(b"\xef\xbb\xbf\n")
    with pytest.warns(UserWarning, match=r"3.txt: empty, skipped"):
        prepare(gpt2_cfg([tmp_path / "a"], tmp_path / "with_bom", split="permutation", val_fraction=0.5))
    prepare(gpt2_cfg([tmp_path / "b"], tmp_path / "without", split="permutation", val_fraction=0.5))
    for split in ("train", "val"):
        assert np.array_equal(all_tokens(tmp_path / "with_bom", split), all_tokens(tmp_path / "without", split))


def test_an_empty_parquet_file_is_skipped_with_a_warning(tmp_path):
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    write_corpus(tmp_path / "src", n_docs=20)
    pq.write_table(pa.table({"text": [None, "", "  \n"]}), tmp_path / "src" / "blank.parquet")
    with pytest.warns(UserWarning, match=r"blank.parquet: no non-empty documents"):
        prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", split="permutation"))


def damaged_vocab(damage: str) -> tuple[bytes, str]:
    """GPT-2's vocab.json damaged one way, and what the refusal must say."""
    vocab = json.loads((GPT2_VOCAB / "vocab.json").read_bytes())
    if damage == "cut short":
        return (GPT2_VOCAB / "vocab.json").read_text(encoding="utf-8")[:1000].encode(), "not valid JSON"
    if damage == "not GPT-2's":
        return b'{"a": 0, "b": 1}', "2 tokens, not 50257"
    if damage == "a token outside the byte alphabet":  # "\u4e00" is no char of GPT-2's byte-to-unicode table
        vocab["\u4e00"] = vocab.pop("the")
        return json.dumps(vocab).encode(), "entry '\u4e00'"
    vocab["the"] = "1169"  # damage == "a rank that is no int"
    return json.dumps(vocab).encode(), "entry 'the'"


@pytest.mark.parametrize("damage", ["cut short", "not GPT-2's", "a token outside the byte alphabet",
                                    "a rank that is no int"])
def test_a_damaged_vocab_json_is_one_line_before_anything_is_written(tmp_path, damage):
    write_corpus(tmp_path / "src", n_docs=20)
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    (vocab_dir / "merges.txt").write_bytes((GPT2_VOCAB / "merges.txt").read_bytes())
    text, says = damaged_vocab(damage)
    (vocab_dir / "vocab.json").write_bytes(text)
    with pytest.raises(UserError, match=r"vocab/vocab.json: not") as refused:
        prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", gpt2_vocab_dir=vocab_dir))
    assert says in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_gpt2_ranks_are_each_tokens_bytes(tmp_path):
    """Against the byte-to-unicode table written out here from GPT-2's encoder.py, not tokenizer's copy of it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    vocab = json.loads((GPT2_VOCAB / "vocab.json").read_bytes())
    ranks = tokenizer.gpt2_ranks(GPT2_VOCAB)
    assert len(ranks) == 50256 and ranks[b" the"] == vocab["\u0120the"] == 262
    assert ranks == {bytes(byte_of[c] for c in token): rank for token, rank in vocab.items() if token != "<|endoftext|>"}


@pytest.mark.parametrize("name", ["meta.json", data.STATE_FILE])
def test_a_damaged_meta_or_state_file_is_one_line_and_left_as_it_is(tmp_path, name):
    write_corpus(tmp_path / "src", n_docs=20)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_text('{"args": ')
    for text in ('{"args": ', "[1, 2]"):
        (tmp_path / "out" / name).write_text(text)
        with pytest.raises(UserError, match=rf"out/{name}: not"):
            prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out"))
        assert (tmp_path / "out" / name).read_text() == text
        assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


def test_a_failed_preparation_leaves_a_tokenizer_json_it_did_not_write(tmp_path):
    """One document, hash split: none goes to val, so the preparation is discarded — only what it wrote."""
    (tmp_path / "a.txt").write_text("One play alone.\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("the user's own")
    with pytest.raises(UserError, match=r"no document went to val"):
        prepare(gpt2_cfg([tmp_path / "a.txt"], tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tokenizer.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "the user's own"


def test_inputs_in_another_order_are_refused_saying_so(tmp_path):
    (tmp_path / "a.txt").write_text("The first play.\n")
    (tmp_path / "b.txt").write_text("The second play.\n")
    prepare(gpt2_cfg([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", split="permutation"))
    with pytest.raises(UserError, match=r"prepared from the same --inputs in another order"):
        prepare(gpt2_cfg([tmp_path / "b.txt", tmp_path / "a.txt"], tmp_path / "out", split="permutation"))


@pytest.mark.parametrize("split, message", [("hash", r"empty.txt: no non-empty document"),
                                            ("permutation", r"empty.txt: 0 non-empty document\(s\)")])
def test_a_corpus_of_empty_files_names_them(tmp_path, split, message):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.warns(UserWarning, match="empty, skipped"), pytest.raises(UserError, match=message):
        prepare(gpt2_cfg([tmp_path / "empty.txt"], tmp_path / "out", split=split))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shards", [None, [], [{"file": "train.bin"}], [{"file": "train.bin", "tokens": "9"}]])
def test_a_hand_edited_shard_list_is_one_line(tiny_data, tmp_path, shards):
    out = tmp_path / "data"
    out.mkdir()
    for p in tiny_data.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    meta = json.loads((out / "meta.json").read_text())
    meta["splits"]["train"]["shards"] = shards
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"meta.json: \"train\" shards are not a list"):
        TokenSplit(out, "train", block_size=8, model_vocab=meta["vocab_size"])


def test_a_skipped_file_is_one_line_on_the_command_line(tmp_path):
    write_corpus(tmp_path / "src", n_docs=20)
    (tmp_path / "src" / "empty.txt").write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--inputs", str(tmp_path / "src"),
                           "--out-dir", str(tmp_path / "out"), "--gpt2-vocab-dir", str(GPT2_VOCAB), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"gust: warning: {tmp_path / 'src' / 'empty.txt'}: empty, skipped"]
