"""CLIP's byte-level BPE tokenizer, written from the published description of the algorithm.

The text encoder of CLIP (and so of CLIP-Count) was trained on ids produced by this exact procedure,
so every step below must match it token for token:

1. Clean the text: ``ftfy.fix_text`` when ftfy is installed (otherwise only Unicode NFC, the part of
   ftfy that matters for ordinary prompts), HTML-unescape twice, collapse whitespace, lower-case.
2. Split it into words with CLIP's regular expression (letters runs, single digits, punctuation runs,
   English contractions).
3. Map each word's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark the last
   character with ``</w>`` and apply the ranked BPE merges until none applies.
4. Look the resulting symbols up in the vocabulary: 256 byte symbols, their ``</w>`` forms, one symbol
   per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Deliberate choice: the literal strings ``<|startoftext|>``/``<|endoftext|>`` inside a prompt are
tokenised as ordinary text, never as the special tokens, so a prompt cannot inject an end-of-text
marker (which decides where the text feature is read).
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import os
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from clipcount.errors import CheckpointError, ConfigError, PromptError

try:  # CLIP's pattern needs Unicode classes (\p{L}, \p{N}) that only `regex` supports.
    import regex as _regex_module

    _HAVE_REGEX = True
except ImportError:  # pragma: no cover - exercised only where `regex` is missing
    _regex_module = None
    _HAVE_REGEX = False

try:  # Optional: CLIP itself ran ftfy.fix_text first; without it we fall back to NFC only.
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP keeps the first 49152 - 256 - 2 merges of the file (the file's first line is a version header).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
WORD_CACHE_SIZE = 10_000

# CLIP's word splitter, without its two special-token alternatives (see the module docstring).
_CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Stand-in for the standard library: [^\W\d_] is "alphanumeric but not a decimal digit nor _", which
# equals \p{L} for every letter; it differs only for rare non-decimal numerals such as "²" or "½".
_STDLIB_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""


def _compile_word_pattern() -> re.Pattern:
    """CLIP's pre-tokenizer regex, compiled with `regex` when available (exact), else `re` (close)."""
    if _HAVE_REGEX:
        return _regex_module.compile(_CLIP_WORD_PATTERN, _regex_module.IGNORECASE)
    return re.compile(_STDLIB_WORD_PATTERN, re.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP table mapping each byte 0..255 to a printable, non-whitespace character.

    Printable Latin-1 bytes map to themselves; the remaining 68 (controls, space, ...) are given the
    code points 256, 257, ... in byte order, so BPE never sees whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def byte_symbols_in_vocab_order() -> list[str]:
    """The 256 byte symbols in the order CLIP's vocabulary lists them.

    That is the insertion order of `bytes_to_unicode`: printable bytes ascending, then the others.
    """
    return list(bytes_to_unicode().values())


def clean_text(text: str) -> str:
    """CLIP's text cleanup: fix mojibake (ftfy or NFC), HTML-unescape, collapse whitespace, lower-case."""
    text = _ftfy.fix_text(text) if _ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))  # twice, as CLIP does, for doubly escaped web text
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


def read_merges(vocab_path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The first `NUM_MERGES` merge pairs of CLIP's gzipped BPE file, in rank order.

    Reads the file line by line and stops early: only about a fifth of it is used, which keeps
    construction fast enough for every model to own its tokenizer.
    """
    path = _resolve_vocab_path(vocab_path)
    merges: list[tuple[str, str]] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            handle.readline()  # version header
            for line in handle:
                parts = line.split()
                if len(parts) != 2:
                    raise CheckpointError(
                        f"BPE vocabulary {path}: line {len(merges) + 2} is not a pair of symbols "
                        f"({line.strip()!r}); use CLIP's bpe_simple_vocab_16e6.txt.gz."
                    )
                merges.append((parts[0], parts[1]))
                if len(merges) == NUM_MERGES:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"BPE vocabulary {path} cannot be read as gzipped UTF-8 text ({exc}); "
            f"use CLIP's bpe_simple_vocab_16e6.txt.gz."
        ) from exc
    if len(merges) != NUM_MERGES:
        raise CheckpointError(
            f"BPE vocabulary {path} has {len(merges)} merges, CLIP needs {NUM_MERGES}; "
            f"use CLIP's bpe_simple_vocab_16e6.txt.gz."
        )
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """CLIP's id -> symbol list: bytes, bytes + ``</w>``, one symbol per merge, then the two specials."""
    byte_symbols = byte_symbols_in_vocab_order()
    symbols = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    symbols += ["".join(pair) for pair in merges]
    symbols += [START_OF_TEXT, END_OF_TEXT]
    return symbols


def _resolve_vocab_path(vocab_path: str | os.PathLike | None) -> Path:
    """The given vocabulary file, or the one packaged in `clipcount/assets`; must exist."""
    if vocab_path is None:
        path = Path(str(importlib.resources.files("clipcount") / "assets" / VOCAB_FILENAME))
    else:
        path = Path(vocab_path)
    if not path.is_file():
        raise CheckpointError(
            f"BPE vocabulary {path} not found; pass the path of CLIP's {VOCAB_FILENAME} "
            f"(or reinstall clipcount, which ships it in clipcount/assets)."
        )
    return path


def _word_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of a word."""
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair` in `word`, left to right, by its join."""
    first, second = pair
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


class ClipTokenizer:
    """Text -> CLIP token ids (and back), matching OpenAI CLIP's tokenizer.

    Each instance owns its tables and a small LRU cache of word -> BPE symbols, so instances are
    independent (no module-level state); loading takes well under half a second.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        merges = read_merges(vocab_path)
        symbols = build_vocab(merges)
        self._encoder: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self._decoder: list[str] = symbols
        self._ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._word_pattern = _compile_word_pattern()
        self._cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._cache_lock = threading.Lock()  # the Gradio app may tokenise from several threads

        self.vocab_size: int = len(symbols)
        self.sot_token_id: int = self._encoder[START_OF_TEXT]
        self.eot_token_id: int = self._encoder[END_OF_TEXT]

    # ----------------------------------------------------------------------------------- BPE
    def _bpe(self, word: str) -> tuple[str, ...]:
        """BPE symbols of one pre-token (already byte-mapped), cached per instance."""
        with self._cache_lock:
            cached = self._cache.get(word)
            if cached is not None:
                self._cache.move_to_end(word)
                return cached
        symbols = tuple(self._apply_merges(word))
        with self._cache_lock:
            self._cache[word] = symbols
            if len(self._cache) > WORD_CACHE_SIZE:
                self._cache.popitem(last=False)
        return symbols

    def _apply_merges(self, word: str) -> list[str]:
        """Greedy BPE: repeatedly merge the adjacent pair with the lowest rank until none is ranked."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(parts) > 1:
            best = min(_word_pairs(parts), key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            parts = _merge_pair(parts, best)
        return parts

    # ------------------------------------------------------------------------------- public
    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens. Empty or blank text gives []."""
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for piece in self._word_pattern.findall(clean_text(text)):
            mapped = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[symbol] for symbol in self._bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: start tokens are skipped and decoding stops at the first end token.

        So a padded row from `__call__` decodes to its text. Words are separated by single spaces
        (CLIP's cleanup already lost the original spacing and case); invalid UTF-8 becomes U+FFFD.
        """
        symbols: list[str] = []
        for raw in ids:
            token_id = int(raw)
            if token_id == self.eot_token_id:
                break
            if token_id == self.sot_token_id:
                continue
            if not 0 <= token_id < self.vocab_size:
                raise PromptError(
                    f"token id {token_id} is outside CLIP's vocabulary (0..{self.vocab_size - 1})"
                )
            symbols.append(self._decoder[token_id])
        joined = "".join(symbols)
        # `</w>` marks word ends; split on it so the byte mapping never sees the marker.
        words = joined.split(END_OF_WORD)
        data = b" ".join(bytes(self._byte_decoder[c] for c in word) for word in words)
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        """Token id rows for CLIP's text encoder: (N, context_length) int64.

        Each row is [sot, ids..., eot, 0, 0, ...]. Text that does not fit is truncated so that the
        last position holds eot; a bare str counts as one text.
        """
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(
                f"context_length must be an int >= 2 (room for the start and end tokens), "
                f"got {context_length!r}; CLIP uses 77."
            )
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: context_length - 2]
            tokens = [self.sot_token_id, *ids, self.eot_token_id]
            rows[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return rows


def default_tokenizer() -> ClipTokenizer:
    """A new tokenizer on the packaged CLIP vocabulary (cheap enough to give each model its own)."""
    return ClipTokenizer()
