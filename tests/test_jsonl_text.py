"""gpt2_bpe's JSONL reader (jsonl_text.c) against json.loads, line by line: the same text, the same skip, the same
warning or error, on awkward lines and on random (often broken) ones; and plain lines really take the C path."""
import json
import random
import warnings

import pytest

import data_sources
import gpt2_bpe
from errors import UserError

PATH = data_sources.Path("corpus.jsonl")
AWKWARD = [
    b'{"text": "hello"}', b'{"text":"a\\nb\\u00e9\\ud83d\\ude00 \\u65e5"}', b'  {"text" : "a" , "id": 1}  \r\n',
    b'{"id": [1, {"a": null, "b": [true, false]}, -1.5e3, 0, "s"], "text": "q"}', b'{"t\\u0065xt": "escaped key"}',
    b'{"text": "a\\/b\\\\c\\"d\\b\\f\\r\\t"}', b'{"text": "\\u0000"}', b'{"text": "<|endoftext|>"}',
    b'{"text": "\xc3\xa9"}',
    b'{"text": "\\ud800"}', b'{"text": "\\udc00x"}', b'{"text": "x\\ud83dy"}', b'{"text": "\\ud83d\\u0041"}',
    b'{"text": "a", "text": "b"}', b'{"text": 5}', b'{"text": null}', b'{"text": ["a"]}', b'{"txt": "a"}', b'{}',
    b'[]', b'"text"', b'5', b'{"text": "a"', b'{"text": "a",}', b'{"text": "a"} x', b'{"text": "a"}}', b'{"text" "a"}',
    b'{"text": "\\x"}', b'{"text": "\\u12"}', b'{"text": "\\u12G4"}', b'{"text": "tab\there"}', b'{"text": "\x1f"}',
    b'{"text": "   "}', b'{"text": ""}', b'{"text": "\\u2003"}', b'{"text": "\\u001f\\n"}', b'{"text": " \\u00a0x"}',
    b'{"text": "\xe3\x80\x80"}', b'{"n": NaN, "text": "a"}', b'{"n": Infinity, "text": "a"}',
    b'{"n": -Infinity, "text": "a"}',
    b'{"n": 01, "text": "a"}', b'{"n": 1., "text": "a"}', b'{"n": -, "text": "a"}', b'{"n": 1e5, "text": "a"}',
    b'{"n": 1E+5, "text": "a"}', b'{"n": .5, "text": "a"}', b'{"n": tru, "text": "a"}', b'{"n": nulls, "text": "a"}',
    b'{"text": "\xff"}', b'{"text": "\xed\xa0\x80"}', b'{"text": "\xc0\xaf"}', b'{"text": "\xf4\x90\x80\x80"}',
    b'{"text": "\xe2\x82"}', b'{"a": "\xff", "text": "b"}', b'\xef\xbb\xbf{"text": "bom"}', b'{\x00"text": "a"}', b'',
    b'   ', b'\x0b\x0c', b'\x0b{"text": "a"}', b'{"a":' + b'[' * 100 + b']' * 100 + b', "text": "deep"}',
    b'{"a": [[[[]]]], "text": "shallow"}', b'{"a": ' + b'1' * 200 + b', "text": "big number"}', b'{"text": "a"}\n\n',
]


@pytest.fixture(autouse=True)
def needs_the_c():
    if not gpt2_bpe.available():
        pytest.skip("gpt2_bpe could not be built (no C compiler)")


def outcome(read):
    """(text or None, warnings, error) of reading one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            text, error = read(), None
        except UserError as err:
            text, error = None, str(err)
    return text, [str(w.message) for w in caught], error


def by_json_loads(line: bytes):
    return outcome(lambda: data_sources._jsonl_text(PATH, 1, line, "text"))


def by_c(line: bytes):
    # b"" is no line at all: nothing comes
    return outcome(lambda: next(iter(data_sources._block_texts(PATH, 0, line, len(line), "text")[0]), None))


@pytest.mark.parametrize("line", [b'{"n": ' + b'1' * 5000 + b', "text": "a"}', b'[' * 100_000 + b']' * 100_000,
                                  b'{\x00ab', b'\x00\x00{"text": "a"}'], ids=["5000 digits", "deep", "nul", "nuls"])
def test_lines_python_cannot_read_stop_with_one_line_with_or_without_the_c(line, monkeypatch):
    """json.loads refuses these with a ValueError or RecursionError (or, from bytes, would guess UTF-16 from the
    NULs): one line naming file and line, whether the C hands them over or Python splits the block itself."""
    block = b'{"text": "a"}\n' + line + b'\n'
    with_c = outcome(lambda: data_sources._block_texts(PATH, 0, block, len(block), "text"))
    monkeypatch.setattr(gpt2_bpe, "available", lambda: False)
    without = outcome(lambda: data_sources._block_texts(PATH, 0, block, len(block), "text"))
    assert with_c == without and with_c[2] is not None and with_c[2].startswith("corpus.jsonl:2: ")


@pytest.mark.parametrize("line", AWKWARD, ids=range(len(AWKWARD)))
def test_awkward_lines_read_as_json_loads_reads_them(line):
    assert by_c(line) == by_json_loads(line)


def test_plain_lines_take_the_c_path():
    """Not handed back to Python: else the reader is json.loads again (and as slow)."""
    lines = [b'{"text": "hello"}', b'{"id": 3, "text": "a\\nb\\u00e9\\ud83d\\ude00", "meta": {"x": [1.5, null]}}',
             b'{"text": "\xc3\xa9t\xc3\xa9"}', b'   ', b'{"text": " \\n "}']
    block = b"\n".join(lines) + b"\n"
    status, _, _, texts = gpt2_bpe.jsonl_texts(block + b'{"text": "not read"}', len(block), b"text")
    assert status.tolist() == [gpt2_bpe.TEXT] * 3 + [gpt2_bpe.BLANK] * 2
    assert texts.tobytes() == "hello".encode() + "a\nbé😀".encode() + "été".encode()


def random_line(rng: random.Random, max_length: int = 12, plain_weight: int = 1) -> bytes:
    alphabet = ["a", "Z", " ", "\n", "\t", '"', "\\", "/", "é", "日", "😀", "\u2003", "\x00", "\x1f", "\ud800",
                "{", ","] + ["a~ "] * plain_weight  # plain runs: the C reads those 8 bytes a step
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, max_length)))
    record = {rng.choice(["id", "meta", "x"]): rng.choice([1, -2.5, None, True, [1, "a"], {"k": "v"}]), "text": text}
    if rng.random() < 0.1:
        record["text"] = rng.choice([5, None, ["a"]])
    items = list(record.items())
    rng.shuffle(items)
    line = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    for _ in range(rng.choice([0, 0, 1, 2])):  # some lines broken: a byte deleted, replaced or inserted
        at, byte = rng.randrange(len(line)), bytes([rng.choice(b'{}[]",:\\ u0\x80\xff')])
        line = line[:at] + rng.choice([b"", byte, byte + line[at:at + 1]]) + line[at + 1:]
    return line


@pytest.mark.parametrize("max_length, plain_weight", [(12, 1), (60, 30)], ids=["short", "long-plain-runs"])
def test_random_lines_read_as_json_loads_reads_them(max_length, plain_weight):
    """Short texts of awkward characters; and long ones, mostly plain runs with a special byte at every offset of an
    8-byte word now and then."""
    rng = random.Random(0)
    for _ in range(3000):
        line = random_line(rng, max_length, plain_weight)
        assert by_c(line) == by_json_loads(line), line


@pytest.mark.parametrize("with_c", [True, False], ids=["c", "json.loads"])
def test_a_block_of_many_lines_gives_each_line_its_text(with_c, monkeypatch):
    """Offsets across lines: texts, skips and line numbers of a whole block, as line-by-line json.loads gives;
    and the same where gpt2_bpe cannot be built (the block split into lines in Python)."""
    rng = random.Random(1)
    lines = [line for line in (random_line(rng) for _ in range(2000)) if by_json_loads(line)[2] is None][:500]
    block = b"\n".join(lines) + b"\n"
    if not with_c:
        monkeypatch.setattr(gpt2_bpe, "available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [(data_sources._jsonl_text(PATH, 7 + i + 1, line, "text"), 7 + i + 1) for i, line in enumerate(lines)]
        want = [(text, line_no) for text, line_no in want if text is not None]
        texts, line_numbers, n_lines = data_sources._block_texts(PATH, 7, block, len(block), "text")
        assert (list(zip(texts, line_numbers)), n_lines) == (want, len(lines))
