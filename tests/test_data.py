"""data.py: the real GPT-2 tokenizer, prepare's outputs and split rule, the batch order, and clear errors."""
import json
import shutil

import numpy as np
import pytest

from conftest import GPT2_VOCAB, PLAYS
from configs import PrepareConfig
from data import TokenSplit, prepare, read_documents, split_documents
from tokenizer import gpt2_tokenizer
from errors import UserError


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    return gpt2_tokenizer(GPT2_VOCAB)


def test_gpt2_tokenizer_known_ids(gpt2):
    assert gpt2.encode("Hello world").ids == [15496, 995]
    assert gpt2.token_to_id("<|endoftext|>") == 50256 and gpt2.get_vocab_size() == 50257


def test_gpt2_round_trip_on_the_whole_corpus(gpt2):
    texts = [p.read_text() for p in sorted(PLAYS.glob("*_gut.txt"))]
    assert len(texts) == 42
    for text, enc in zip(texts, gpt2.encode_batch(texts)):
        assert gpt2.decode(enc.ids) == text


def test_prepare_writes_bins_and_sidecar(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["tokenizer"]["kind"] == "bpe"
    for split in ("train", "val"):
        info, tokens = meta["splits"][split], np.fromfile(tiny_data / f"{split}.bin", dtype=np.uint16)
        assert info["tokens"] == len(tokens) and tokens.max() < 512
        assert info["bytes"] > 1.5 * info["tokens"]  # even a 512-token BPE packs more than a byte per token
    eot_count = int((np.fromfile(tiny_data / "train.bin", dtype=np.uint16) == meta["eot_id"]).sum())
    assert eot_count == meta["splits"]["train"]["documents"] - 1  # exactly one between documents
    assert len(meta["val_documents"]) == 2  # 25% of 8 plays, whole plays
    assert meta["split"] == "permutation" and meta["splits"]["train"]["max_token_id"] == tokens_max(tiny_data)


def tokens_max(data_dir):
    return int(np.fromfile(data_dir / "train.bin", dtype=np.uint16).max())


def test_split_is_by_document_seeded_and_recorded():
    first, again, other = split_documents(40, 0.1, 1337), split_documents(40, 0.1, 1337), split_documents(40, 0.1, 7)
    assert np.array_equal(first, again) and not np.array_equal(first, other) and len(first) == 4


def test_jsonl_and_bad_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + '{"text": "lone \\ud800"}\n'
                                      + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning) as caught:
        docs = read_documents([tmp_path])
    assert [text for _, text in docs] == ["one", "two"]
    messages = " ".join(str(w.message) for w in caught)
    assert "empty.txt: empty, skipped" in messages and "latin1.txt: not UTF-8" in messages
    assert "a.jsonl:2: text holds an unpaired surrogate" in messages
    (tmp_path / "b.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl:1: not a JSON object with a \"text\" field"):
        read_documents([tmp_path / "b.jsonl"])


def test_batch_order_is_a_pure_function_of_seed_and_step(tiny_data):
    split = TokenSplit(tiny_data, "train", 32, 512)
    a = split.sample_starts(seed=1, first=64, count=16)
    assert np.array_equal(a, split.sample_starts(seed=1, first=64, count=16))
    assert not np.array_equal(a, split.sample_starts(seed=2, first=64, count=16))
    halves = np.concatenate([split.sample_starts(1, 64, 8), split.sample_starts(1, 72, 8)])
    assert np.array_equal(a, halves)  # any micro-batch split reads the same samples
    one_epoch = split.sample_starts(1, 0, split.n_windows)
    assert len(np.unique(one_epoch)) == split.n_windows  # each window once per epoch


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", ["missing_dir", "odd_size", "sha_mismatch", "too_short", "vocab_too_big",
                                  "id_out_of_range", "missing_sidecar", "fingerprint_mismatch", "empty_val",
                                  "no_val_entry", "shard_entry_incomplete"])
def test_bad_data_gives_one_clear_line(tiny_data, tmp_path, case):
    data = copy_data(tiny_data, tmp_path / "data")
    block_size, model_vocab, verify = 32, 512, "full"
    if case == "missing_dir":
        data, expected = tmp_path / "nowhere", "nowhere: data directory not found"
    elif case == "odd_size":
        with open(data / "val.bin", "ab") as f:
            f.write(b"\x00")
        expected = "val.bin: .* is not a multiple of 2"
    elif case == "sha_mismatch":
        tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
        tokens[0] = (tokens[0] + 1) % 512
        tokens.tofile(data / "val.bin")
        expected = "val.bin: sha256 differs from meta.json"
    elif case == "too_short":
        block_size, expected = 10**7, r"val.bin: [\d,]+ tokens, but block_size \+ 1 = 10,000,001 are needed"
    elif case == "vocab_too_big":
        model_vocab, expected = 300, "meta.json: vocab_size 512 > --model.vocab-size 300"
    elif case == "id_out_of_range":  # a .bin edited after prepare: --data.verify full reads every token id
        tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
        tokens[5] = 600
        tokens.tofile(data / "val.bin")
        model_vocab, verify, expected = 550, "full", "val.bin: token id 600 >= --model.vocab-size 550"
        meta = json.loads((data / "meta.json").read_text())
        meta["vocab_size"] = 550
        meta["splits"]["val"]["shards"][0]["sha256"] = __import__("data").sha256_file(data / "val.bin")
        (data / "meta.json").write_text(json.dumps(meta))
    elif case == "fingerprint_mismatch":  # the default check: ~1 MB of the file, here the whole tiny file
        tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
        tokens[-1] = (tokens[-1] + 1) % 512
        tokens.tofile(data / "val.bin")
        verify, expected = "fingerprint", "val.bin: fingerprint differs from meta.json"
    elif case == "empty_val":  # issue 15: name the file, not "cannot mmap an empty file"
        (data / "val.bin").write_bytes(b"")
        meta = json.loads((data / "meta.json").read_text())
        meta["splits"]["val"]["tokens"] = meta["splits"]["val"]["shards"][0]["tokens"] = 0
        (data / "meta.json").write_text(json.dumps(meta))
        expected = r"val.bin: empty \(0 tokens\)"
    elif case == "no_val_entry":  # issue 15: one line, not a raw KeyError
        meta = json.loads((data / "meta.json").read_text())
        del meta["splits"]["val"]
        (data / "meta.json").write_text(json.dumps(meta))
        expected = r"meta.json: no \"val\" split \(splits: train\)"
    elif case == "shard_entry_incomplete":
        meta = json.loads((data / "meta.json").read_text())
        del meta["splits"]["val"]["tokens"]
        (data / "meta.json").write_text(json.dumps(meta))
        expected = r"meta.json: \"val\" entry lacks tokens"
    else:
        (data / "meta.json").unlink()
        expected = "meta.json: sidecar missing"
    before = snapshot(data) if data.is_dir() else {}
    with pytest.raises(UserError, match=expected):
        TokenSplit(data, "val", block_size, model_vocab, verify=verify)
    assert (snapshot(data) if data.is_dir() else {}) == before  # nothing on disk was touched


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_text("general kenobi")
    with pytest.raises(UserError, match="none: no vocab.json .* pass --gpt2-vocab-dir"):
        prepare(PrepareConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", gpt2_vocab_dir=tmp_path / "none"))
    assert not (tmp_path / "out").exists()  # issue 15: nothing written before the tokenizer is known good


def test_prepare_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    """issue 15: data.py prepare goes through errors.run_cli: one line, exit status 2, no output directory."""
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "a.txt").write_text("hello there")
    proc = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--inputs", str(tmp_path),
                           "--out-dir", str(tmp_path / "out"), "--gpt2-vocab-dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "gust: error:" in proc.stderr and "no vocab.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tokenizer_hint_names_the_meta_json_it_came_from(tiny_data, tmp_path):
    """issue 15: sample.py has no --gpt2-vocab-dir, so the hint names the meta.json that points at the files."""
    from data import load_tokenizer

    meta = json.loads((tiny_data / "meta.json").read_text())
    meta["tokenizer"] = {"kind": "gpt2", "vocab_dir": str(tmp_path / "gone")}
    data = copy_data(tiny_data, tmp_path / "data")
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as caught:
        load_tokenizer(data)
    assert str(data / "meta.json") in str(caught.value) and "--gpt2-vocab-dir" not in str(caught.value)


def test_global_batches_are_the_same_for_any_world_size_and_accumulation(tiny_data):
    """The token ids of each step's global batch, hashed: 1 rank × 2 micro-steps == 2 ranks × 1 == 4 ranks × 1."""
    import hashlib

    from data import rank_rows

    split, global_batch = TokenSplit(tiny_data, "train", 32, 512), 8

    def batch_hash(step, world_size, micro_batch):
        rows = []
        for rank in range(world_size):
            for micro_step in range(global_batch // (world_size * micro_batch)):
                sl = rank_rows(global_batch, world_size, rank, micro_batch, micro_step)
                x, _ = split.windows(split.sample_starts(7, step * global_batch + sl.start, micro_batch))
                rows.append(x.numpy())
        return hashlib.sha256(np.concatenate(rows).tobytes()).hexdigest()

    for step in range(20):
        assert batch_hash(step, 1, 4) == batch_hash(step, 2, 4) == batch_hash(step, 4, 2) == batch_hash(step, 1, 8)
