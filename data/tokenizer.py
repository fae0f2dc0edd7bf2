"""Tokenizers: one `Tokenizer` class over a Hugging Face `tokenizers` object, whatever its origin.

Three origins, one on-disk form (`tokenizer.json`):
  - `train_bpe(texts, vocab_size)`: a byte-level BPE trained here, with `SPECIAL_TOKENS` reserved;
  - `gpt2_tokenizer()`: tiktoken's GPT-2 encoding converted to an equivalent byte-level BPE
    (the conversion is exact for GPT-2's regex and merge ranks; `tests/test_data.py` checks it
    token-for-token against tiktoken), so a data folder made with `--tokenizer gpt2` holds a plain
    `tokenizer.json` and needs neither tiktoken nor network afterwards;
  - any `tokenizer.json` file.
`sha256` hashes the canonical JSON (keys sorted, compact, merges as "a b" strings) so the same
tokenizer hashes the same whatever the file's formatting or the `tokenizers` release wrote it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from kernels.common import FurnaceError
from model.fileio import atomic_write

log = logging.getLogger("furnace")

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TOKENIZER_FILE = "tokenizer.json"
# GPT-2's pre-tokenization regex (tiktoken's "gpt2" pat_str and HF's ByteLevel use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """encode/decode plus the ids the rest of Furnace needs. `vocab_size` includes added tokens."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        self._sha: str | None = None

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Special tokens written literally in `text` (e.g. `<|im_start|>`) become their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` as plain text: a literal `<|endoftext|>` in a document is just characters."""
        return self.encode_batch([text], ordinary=True)[0]

    def encode_batch(self, texts: list[str], ordinary: bool = False) -> list[list[int]]:
        """Encode many texts on all cores (the Rust library's thread pool)."""
        self.hf.encode_special_tokens = ordinary
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.hf.encode_special_tokens = False

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.hf.get_added_tokens_decoder().items()) if t.special}

    @property
    def eos_id(self) -> int:
        i = self.hf.token_to_id(EOS)
        if i is None:
            raise FurnaceError(f"tokenizer {self.source}: has no {EOS} token; Furnace separates documents "
                               f"with it (add it with add_special_tokens or use a tokenizer that has it)")
        return i

    def token_id(self, s: str) -> int | None:
        """Id of the single token `s`, or None when the vocabulary has no such token."""
        return self.hf.token_to_id(s)

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add special tokens not yet present; returns how many were added (changes `sha256`)."""
        new = [t for t in tokens if self.hf.token_to_id(t) is None]
        n = self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        self._sha = None
        return n

    # ---- identity and files -------------------------------------------------------------------
    def canonical_json(self) -> bytes:
        return canonical_json(self.hf.to_str())

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = hashlib.sha256(self.canonical_json()).hexdigest()
        return self._sha

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        return atomic_write(d / TOKENIZER_FILE, self.hf.to_str(pretty=True))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r}, sha256={self.sha256[:12]})"


def canonical_json(text: str) -> bytes:
    """Sorted keys, compact separators, merges written as "a b" strings (tokenizers < 0.20 style)."""
    obj = json.loads(text)
    model = obj.get("model") or {}
    if isinstance(model.get("merges"), list):
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A data folder, a checkpoint folder (both hold tokenizer.json) or a tokenizer.json file."""
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not p.exists():
        raise FurnaceError(f"tokenizer {p}: no such file or directory (expected a data folder, a checkpoint "
                           f"folder or a {TOKENIZER_FILE} file)")
    if not f.is_file():
        raise FurnaceError(f"tokenizer {p}: folder holds no {TOKENIZER_FILE} (expected a data folder made by "
                           f"data/prepare.py, a checkpoint folder, or the path of a {TOKENIZER_FILE})")
    try:
        hf = HFTokenizer.from_file(str(f))
    except Exception as e:  # the Rust library raises a bare Exception for every parse error
        raise FurnaceError(f"tokenizer {f}: not a valid Hugging Face {TOKENIZER_FILE} ({e})") from None
    return Tokenizer(hf, source=str(f))


def _byte_level_bpe(vocab=None, merges=None) -> HFTokenizer:
    """An (optionally empty) byte-level BPE: GPT-2 regex split, bytes as printable chars, exact decode."""
    tok = HFTokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (an iterator; the library consumes it in batches).
    All 256 bytes are in the vocabulary, so any text round-trips exactly through encode/decode."""
    specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise FurnaceError(f"--tokenizer train:{vocab_size}: vocab size must be at least {floor} "
                           f"(256 bytes + {len(specials)} special tokens)")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        log.info(f"tokenizer: the corpus gave only {got} tokens of the {vocab_size} asked for (too few repeated "
                 f"pairs); vocab_size is {got}")
    return Tokenizer(tok, source=f"train:{vocab_size}")


# ---- tiktoken -> tokenizer.json ------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiktoken_to_tokenizer(encoding, source: str = "tiktoken") -> Tokenizer:
    """Convert a tiktoken `Encoding` that uses GPT-2's regex into an equivalent byte-level BPE.
    tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing, for each
    token, every split into two existing tokens at that token's rank reproduces that order."""
    if encoding._pat_str != GPT2_PATTERN:
        raise FurnaceError(f"tokenizer {source}: only tiktoken encodings with GPT-2's split pattern can be "
                           f"converted (got {encoding._pat_str[:40]!r}...); pass a {TOKENIZER_FILE} instead")
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    b2u = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {s(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((s(a), s(b)) for a, b in splits)
    hf = _byte_level_bpe(vocab, merges)
    specials = sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])
    for content, i in specials:
        if i != hf.get_vocab_size(with_added_tokens=True):
            raise FurnaceError(f"tokenizer {source}: special token {content!r} has id {i}, expected the next "
                               f"free id {hf.get_vocab_size(with_added_tokens=True)}")
        hf.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    return Tokenizer(hf, source=source)


def gpt2_tokenizer() -> Tokenizer:
    """tiktoken's GPT-2 encoding as a Tokenizer (tiktoken downloads its BPE file the first time)."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests/urllib errors of many kinds when offline
        raise FurnaceError(f"--tokenizer gpt2: tiktoken could not load the GPT-2 encoding ({type(e).__name__}: "
                           f"{str(e)[:120]}); it needs network the first time (or a filled TIKTOKEN_CACHE_DIR); "
                           f"offline, pass the path of a GPT-2 {TOKENIZER_FILE} instead") from None
    return tiktoken_to_tokenizer(enc, source="gpt2")
