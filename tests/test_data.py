"""data.py: the real GPT-2 tokenizer, prepare's outputs and split rule, the batch order, and clear errors."""
import json
import shutil

import numpy as np
import pytest

from conftest import GPT2_VOCAB, PLAYS
from configs import PrepareConfig
from data import TokenSplit, gpt2_tokenizer, prepare, read_documents, split_documents


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


def test_split_is_by_document_seeded_and_recorded():
    first, again, other = split_documents(40, 0.1, 1337), split_documents(40, 0.1, 1337), split_documents(40, 0.1, 7)
    assert np.array_equal(first, again) and not np.array_equal(first, other) and len(first) == 4


def test_jsonl_and_bad_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning) as caught:
        docs = read_documents([tmp_path])
    assert [text for _, text in docs] == ["one", "two"]
    messages = " ".join(str(w.message) for w in caught)
    assert "empty.txt: empty, skipped" in messages and "latin1.txt: not UTF-8" in messages
    (tmp_path / "b.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:1: not a JSON object with a \"text\" field"):
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
                                  "id_out_of_range", "missing_sidecar"])
def test_bad_data_gives_one_clear_line(tiny_data, tmp_path, case):
    data = copy_data(tiny_data, tmp_path / "data")
    block_size, model_vocab, verify = 32, 512, True
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
    elif case == "id_out_of_range":  # a .bin edited after prepare, with the check of its sha256 switched off
        tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
        tokens[5] = 600
        tokens.tofile(data / "val.bin")
        model_vocab, verify, expected = 550, False, "val.bin: token id 600 >= --model.vocab-size 550"
        meta = json.loads((data / "meta.json").read_text())
        meta["vocab_size"] = 550
        (data / "meta.json").write_text(json.dumps(meta))
    else:
        (data / "meta.json").unlink()
        expected = "meta.json: sidecar missing"
    before = snapshot(data) if data.is_dir() else {}
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        TokenSplit(data, "val", block_size, model_vocab, verify_sha256=verify)
    assert (snapshot(data) if data.is_dir() else {}) == before  # nothing on disk was touched


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_text("general kenobi")
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        prepare(PrepareConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", gpt2_vocab_dir=tmp_path / "none"))


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
