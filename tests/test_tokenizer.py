"""Tests for clipcount.modeling.tokenizer against an independent implementation.

The reference is `transformers.CLIPTokenizer` (in transformers 5.x the Rust `tokenizers` backend) built
from our own vocabulary file, so any difference is in the algorithm, not in the data. Known, deliberate
differences (tested separately below):
- HTML entities: CLIP (and we) unescape them; transformers' fast tokenizer does not.
- The literal text "<|endoftext|>" in a prompt: transformers turns it into the special token; we
  tokenise it as ordinary characters so a prompt cannot move the end-of-text position.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pytest
import torch

from clipcount.errors import CheckpointError, ConfigError, PromptError
from clipcount.modeling import tokenizer as tokenizer_module
from clipcount.modeling.tokenizer import ClipTokenizer, default_tokenizer

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
CLASSES_TSV = REFERENCE_DIR / "fsc147_classes.tsv"
ASSETS_DIR = Path(tokenizer_module.__file__).resolve().parents[1] / "assets"
PACKAGED_VOCAB = ASSETS_DIR / tokenizer_module.VOCAB_FILENAME

# Inputs on which CLIP's cleanup and transformers' normalizer agree.
ODD_TEXTS = [
    "",
    "   ",
    "crème brûlée",
    "cre\u0300me bru\u0302le\u0301e",  # decomposed accents: NFC makes them equal to the line above
    "日本語",
    "🍎 and 🍏",
    "Red  CARS!!",
    "don't count the people's hats",
    "2 cars, 10 birds & 3.5 apples",
    "tab\tnew\nline",
    "snake_case-with-hyphens",
    "ÄÖÜ straße",
]


def _read_merge_lines(vocab_path: Path) -> list[str]:
    """Merge lines as CLIP uses them: skip the header, keep 49152 - 256 - 2 lines."""
    with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json + merges.txt written from our vocabulary file."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merge_lines = _read_merge_lines(PACKAGED_VOCAB)
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(line.split()) for line in merge_lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]

    folder = tmp_path_factory.mktemp("hf_clip")
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert len(hf) == 49408, "reference tokenizer was not built from the full vocabulary"
    return hf


def _hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def _class_names() -> list[str]:
    if not CLASSES_TSV.is_file():
        pytest.skip(f"FSC-147 class list not found at {CLASSES_TSV} (shared reference data absent)")
    with CLASSES_TSV.open(encoding="utf-8", newline="") as handle:
        return [row["class"] for row in csv.DictReader(handle, delimiter="\t")]


# ------------------------------------------------------------------------------ vocabulary


def test_special_ids_and_vocab_size(tok):
    assert tok.sot_token_id == 49406
    assert tok.eot_token_id == 49407
    assert tok.vocab_size == 49408


def test_known_ids(tok):
    # Published CLIP ids; "car" and "apples" are single tokens (see reference README).
    assert tok.encode("car") == [1615]
    assert tok.encode("apples") == [14032]
    assert tok.encode("hot air balloon") == [2069, 1922, 13634]


def test_loading_is_fast_and_instances_are_independent():
    start = time.perf_counter()
    first = default_tokenizer()
    elapsed = time.perf_counter() - start
    # Target is < 0.5 s; the bound is loose so a busy test machine does not make this flaky.
    assert elapsed < 2.0, f"loading the tokenizer took {elapsed:.2f} s"
    second = default_tokenizer()
    assert first is not second
    first.encode("zebras")
    assert first._cache and not second._cache  # caches are per instance


# ------------------------------------------------------------------ agreement with transformers


def test_matches_transformers_on_fsc147_classes(tok, hf_tok):
    names = _class_names()
    assert len(names) == 150
    pairs = {name: (tok.encode(name), _hf_ids(hf_tok, name)) for name in names}
    mismatches = {name: ids for name, ids in pairs.items() if ids[0] != ids[1]}
    assert not mismatches


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_matches_transformers_on_odd_inputs(tok, hf_tok, text):
    assert tok.encode(text) == _hf_ids(hf_tok, text)


@pytest.mark.parametrize("text", ["car", "Red  CARS!!", "crème brûlée", "日本語", "🍎", ""])
def test_batch_row_matches_transformers_with_special_tokens(tok, hf_tok, text):
    row = tok(text)[0]
    expected = hf_tok(text)["input_ids"]  # [sot, ids..., eot]
    assert row[: len(expected)].tolist() == expected
    assert row[len(expected) :].eq(0).all()


def test_html_entities_are_unescaped_like_clip(tok, hf_tok):
    # Deliberate difference: transformers keeps "&amp;" as text; CLIP unescapes (twice).
    assert tok.encode("fish &amp; chips") == _hf_ids(hf_tok, "fish & chips")
    assert tok.encode("fish &amp;amp; chips") == _hf_ids(hf_tok, "fish & chips")


def test_special_token_text_is_not_injected(tok, hf_tok):
    # Deliberate difference: transformers maps the literal to id 49407; we keep it as plain text.
    ids = tok.encode("cars <|endoftext|> dogs")
    assert tok.eot_token_id not in ids and tok.sot_token_id not in ids
    assert ids == _hf_ids(hf_tok, "cars <| endoftext |> dogs")


# --------------------------------------------------------------------------- batch layout


def test_empty_string_gives_sot_eot_then_padding(tok):
    row = tok("")[0]
    assert row.shape == (77,)
    assert row[:2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert row[2:].eq(0).all()


def test_long_text_is_truncated_with_eot_last(tok, hf_tok):
    text = ("many small red apples on a wooden table, " * 13)[:500]
    assert len(text) == 500
    rows = tok(text)
    assert rows.shape == (1, 77) and rows.dtype == torch.long
    assert rows[0, 0].item() == tok.sot_token_id
    assert rows[0, -1].item() == tok.eot_token_id
    assert rows[0, 1:76].tolist() == _hf_ids(hf_tok, text)[:75]


def test_batch_shape_and_custom_context_length(tok):
    rows = tok(["car", "hot air balloon", ""], context_length=5)
    assert rows.shape == (3, 5)
    assert rows[1].tolist() == [49406, 2069, 1922, 13634, 49407]
    assert tok(["hot air balloon"], context_length=4)[0].tolist() == [49406, 2069, 1922, 49407]
    assert tok([]).shape == (0, 77)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_context_length_too_small_is_an_error(tok, bad):
    with pytest.raises(ConfigError, match="context_length"):
        tok("car", context_length=bad)


def test_non_string_prompt_is_an_error(tok):
    with pytest.raises(PromptError, match="must be a str"):
        tok(["car", None])


# ------------------------------------------------------------------------------ decoding


ROUND_TRIP_TEXTS = ["a red car", "hot air balloon", "people", "green pea", "sea shells on the shore"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trip_plain_lowercase(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_of_a_padded_row_stops_at_eot(tok):
    row = tok("green pea")[0]
    assert tok.decode(row) == "green pea"
    assert tok.decode(row.tolist()) == "green pea"


def test_decode_unicode_and_bad_id(tok):
    assert tok.decode(tok.encode("crème brûlée 日本語")) == "crème brûlée 日本語"
    with pytest.raises(PromptError, match="outside"):
        tok.decode([49408])


# -------------------------------------------------------------------- fallbacks and errors


def test_stdlib_regex_fallback_splits_like_regex(monkeypatch):
    names = _class_names() if CLASSES_TSV.is_file() else []
    exact = tokenizer_module._compile_word_pattern()
    monkeypatch.setattr(tokenizer_module, "_HAVE_REGEX", False)
    approx = tokenizer_module._compile_word_pattern()
    for text in names + ODD_TEXTS + ["it's 42°C, über-cool_stuff!"]:
        cleaned = tokenizer_module.clean_text(text)
        assert approx.findall(cleaned) == exact.findall(cleaned), text


def test_word_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "WORD_CACHE_SIZE", 3)
    tok = ClipTokenizer()
    for word in ["ants", "bees", "cats", "dogs", "eels"]:
        tok.encode(word)
    assert len(tok._cache) == 3
    assert tok.encode("ants") == ClipTokenizer().encode("ants")


def test_missing_vocab_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ClipTokenizer(tmp_path / "nope.txt.gz")


def test_malformed_vocab_files(tmp_path):
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(CheckpointError, match="has 2 merges"):
        ClipTokenizer(short)

    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ClipTokenizer(not_gzip)
