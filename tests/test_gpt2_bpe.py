"""gpt2_bpe (GPT-2's tokenizer in C) against tiktoken, an independent implementation of the same pattern and merges:
random strings built from what the pattern tells apart, every code point, pieces long enough for the heap, lone
surrogates, threads; and the fallback where it cannot be built. The whole corpus: test_data_stream.py."""
import os
import random
import threading

import numpy as np
import pytest

import tokenizer
import gpt2_bpe
from conftest import GPT2_VOCAB

# What the GPT-2 pattern tells apart: each kind of whitespace, the contractions (and their near misses), letters,
# digits, others, combining marks, "<|endoftext|>" and pieces of it
ALPHABET = [*" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u202f\u3000\x1c\x1f",
            *"'sStTmdrevlL!?.,-_\"",
            *"09½²٣Ⅻ", *"aZé日本Æ🤖\u0301\u200d", "<|endoftext|>", "<|", "|>", "'re", "'ve", "'ll", "'RE", " '", "  ", "\n\n"]


@pytest.fixture(scope="module")
def encoders():
    tiktoken = pytest.importorskip("tiktoken")  # noqa: F841  (the reference)
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    if not gpt2_bpe.available():
        pytest.skip("gpt2_bpe could not be built (no C compiler)")
    return gpt2_bpe.Encoder(tokenizer.gpt2_ranks(GPT2_VOCAB), 50256), tokenizer.gpt2_tiktoken(GPT2_VOCAB)


def reference_ids(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special={tokenizer.EOT})


def test_random_strings_get_tiktokens_ids(encoders):
    ours, reference = encoders
    rng = random.Random(0)
    for _ in range(4000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.3:  # anything of planes 0-3 (lone surrogates become U+FFFD, as str.encode needs)
            text += "".join(chr(rng.randint(0x80, 0x3FFFF)) for _ in range(rng.randint(1, 4)))
        assert ours.encode(text).tolist() == reference_ids(reference, text), repr(text)


def test_every_code_point_is_classed_as_tiktoken_classes_it(encoders):
    """Each code point after a letter, after a digit and after a space: one read as the wrong class (letter, digit,
    whitespace, other) cuts the pieces elsewhere, and the ids differ."""
    ours, reference = encoders
    text = "".join(f"a{char}1{char} {char}x\n" for cp in range(0x110000) if not 0xD800 <= cp < 0xE000
                   for char in [chr(cp)])
    assert ours.encode(text).tolist() == reference.encode_ordinary(text)


@pytest.mark.parametrize("text", ["a" * 100_000, " " * 70_000 + "x", "ab" * 30_000, "日" * 20_000, "1" * 5000,
                                  "!?" * 9000, "\n" * 40_000 + "<|endoftext|>" + "\t" * 3])
def test_long_pieces_merge_like_tiktoken(encoders, text):
    ours, reference = encoders
    assert ours.encode(text).tolist() == reference_ids(reference, text)


def test_a_huge_piece_does_not_keep_its_merge_memory(encoders):
    """One 4 MB run of letters (a DNA string, say) needs ~100 MB of merge scratch; it is freed after the piece,
    not held by every tokenizer thread for the rest of the run (found in review: ~230 MB per 10 MB piece kept)."""
    ours, _ = encoders

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    ours.encode("warm up")
    before, ids = rss_mb(), ours.encode_utf8(b"acgt" * 1_000_000)
    assert 0 < len(ids) < 4_000_000
    assert rss_mb() - before < 40, f"{rss_mb() - before:.0f} MB more after the piece"


def test_lone_surrogates_become_the_replacement_character(encoders):
    ours, reference = encoders
    text = "ok \ud800 then \udfff\ud83e\udd16"  # two lone halves, then a pair (🤖)
    assert ours.encode(text).tolist() == reference_ids(reference, text)


def test_threads_encoding_at_once_get_the_ids_one_thread_gets(encoders):
    """Each thread gets its own Encoder (the piece cache is not shared); the C calls run without the GIL."""
    ours, _ = encoders
    texts = [" ".join(random.Random(seed).choice(ALPHABET) for _ in range(20_000)) for seed in range(4)]
    expected = [ours.encode(text).tolist() for text in texts]
    this_thread, results = gpt2_bpe.thread_local_encoder(tokenizer.gpt2_ranks(GPT2_VOCAB), 50256), {}

    def work(index):
        results[index] = [this_thread().encode_utf8(texts[index].encode()).tolist() for _ in range(3)]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert all(results[i] == [expected[i]] * 3 for i in range(len(texts)))


def test_a_failed_build_names_the_compiler_and_prepare_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt2_bpe, "BUILD_DIR", tmp_path)
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="gpt2_bpe: .*false failed on gpt2_bpe.c"):
        gpt2_bpe.build()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left to load
    if GPT2_VOCAB.is_dir() and pytest.importorskip("tiktoken"):
        monkeypatch.setattr(gpt2_bpe, "available", lambda: False)
        assert tokenizer.gpt2_encoder(GPT2_VOCAB)[1] == "tiktoken"


def test_spans_encode_as_tiktoken_encodes_the_texts_joined_by_endoftext(encoders):
    """encode_spans (prepare's call) on texts chosen out of one buffer, some cut in the middle of "<|endoftext|>" or
    holding it, some empty: tiktoken's ids for the chosen texts joined by "<|endoftext|>", from bytes or an array."""
    ours, reference = encoders
    rng = random.Random(1)
    pieces = ["<|endof", "text|>", "<|endoftext|>", "<", "|>", ""]
    texts = ["".join(rng.choice(ALPHABET + pieces) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    texts += ["a<|endof", "text|>b", "", "<|endoftext|>", "x<", "|endoftext|>"]
    all_texts = tokenizer.Texts.of([text.encode() for text in texts])
    chosen = np.array([rng.random() < 0.6 for _ in texts])
    for spans in (all_texts, all_texts.chosen(chosen), all_texts[3:], all_texts[:0]):
        want = reference_ids(reference, tokenizer.EOT.join(text.decode() for text in spans))
        as_array = np.frombuffer(spans.buffer, dtype=np.uint8)
        for buffer in (spans.buffer, as_array):
            assert ours.encode_spans(buffer, spans.starts, spans.ends).tolist() == want


def test_texts_hold_what_a_list_of_the_texts_holds():
    """Texts (spans of one buffer) against the list of bytes it was made of: items, slices, choices, sizes."""
    texts = [b"one", b"", "tw\u00f6".encode(), b"three<|endoftext|>", b"4"]
    spans = tokenizer.Texts.of(texts)
    mask = np.array([True, False, True, True, False])
    assert list(spans) == texts and [spans[i] for i in range(5)] == texts and len(spans) == 5
    assert list(spans[1:4]) == texts[1:4] and list(spans[4:]) == [b"4"]
    assert list(spans.chosen(mask)) == [t for t, m in zip(texts, mask) if m]
    assert list(spans.chosen(~mask)[1:]) == [b"4"]
    assert spans.lengths().tolist() == [len(t) for t in texts] and spans.n_bytes() == sum(map(len, texts))
    assert spans.chosen(mask).n_bytes() == sum(len(t) for t, m in zip(texts, mask) if m)
    as_array = tokenizer.Texts(np.frombuffer(spans.buffer, dtype=np.uint8), spans.starts, spans.ends)
    assert list(as_array) == texts and as_array[3] == texts[3] and isinstance(as_array[3], bytes)
    assert list(tokenizer.Texts.of([])) == [] and tokenizer.Texts.of([]).n_bytes() == 0


def test_spans_outside_their_buffer_are_refused(encoders):
    ours, _ = encoders
    for starts, ends in (([0], [4]), ([-1], [2]), ([2], [1])):
        with pytest.raises(ValueError, match="spans outside their buffer"):
            ours.encode_spans(b"abc", np.array(starts), np.array(ends))
    assert ours.encode_spans(b"abc", np.array([0, 3]), np.array([3, 3])).tolist() == ours.encode("abc").tolist() + [50256]
    with pytest.raises(ValueError, match="must hold bytes"):
        ours.encode_spans(np.zeros(3, dtype=np.int16), np.array([0]), np.array([3]))
