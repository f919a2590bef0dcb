"""The vocabulary of the synthetic counting world: shapes, colours, held-out classes and prompts.

A class is a (colour, shape) pair. A prompt names either one class ("red triangles", "red
triangle") or a shape of any colour ("triangles", "triangle"). Six classes are held out: no
training generator (scenes, prompts, CLIP captions) ever produces them, so counting them at test
time measures zero-shot composition of a seen colour with a seen shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from clipcount.errors import PromptError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "hexagon": "hexagons",
    "cross": "crosses",
}

# A Latin square: every colour and every shape is held out exactly once, so each held-out class
# combines a colour and a shape that are both seen in training (with other partners).
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("green", "triangle"),
        ("blue", "star"),
        ("yellow", "hexagon"),
        ("purple", "circle"),
        ("orange", "cross"),
        ("red", "square"),
    }
)

ALL_CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_CLASSES: tuple[tuple[str, str], ...] = tuple(cs for cs in ALL_CLASSES if cs not in HELD_OUT)

_SINGULAR_OF = {plural: shape for shape, plural in SHAPE_PLURALS.items()}
_LEADING_WORDS = ("a", "an", "the", "all", "some", "every")


class _HasPoints(Protocol):
    def points(self, colour: str | None = None, shape: str | None = None) -> np.ndarray: ...


def is_held_out(colour: str | None, shape: str) -> bool:
    """True for a held-out class; a shape-only prompt (colour None) is never itself held out."""
    return colour is not None and (colour, shape) in HELD_OUT


def format_prompt(colour: str | None, shape: str, plural: bool = True) -> str:
    """("red", "cross") -> "red crosses"; (None, "cross", plural=False) -> "cross"."""
    if shape not in SHAPE_PLURALS:
        raise PromptError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise PromptError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    noun = SHAPE_PLURALS[shape] if plural else shape
    return noun if colour is None else f"{colour} {noun}"


def parse_prompt(text: str) -> tuple[str | None, str]:
    """A prompt -> (colour or None, shape). Case, extra spaces, a leading article and trailing
    punctuation are ignored: "The Red Triangles." -> ("red", "triangle"); "stars" -> (None, "star")."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    words = re.sub(r"[^a-z ]+", " ", text.lower()).split()
    if words and words[0] in _LEADING_WORDS and len(words) > 1:
        words = words[1:]
    colour: str | None = None
    if len(words) == 2 and words[0] in COLOURS:
        colour, words = words[0], words[1:]
    if len(words) == 1:
        noun = words[0]
        if noun in SHAPE_PLURALS:
            return colour, noun
        if noun in _SINGULAR_OF:
            return colour, _SINGULAR_OF[noun]
    raise PromptError(
        f"cannot read the prompt {text!r}: write '<colour> <shape>' or '<shape>', singular or "
        f"plural, with a colour from {', '.join(COLOURS)} and a shape from "
        f"{', '.join(SHAPE_PLURALS.values())}"
    )


def count_for_prompt(scene: _HasPoints, text: str) -> int:
    """How many objects of `scene` the prompt refers to (a shape-only prompt counts every colour)."""
    colour, shape = parse_prompt(text)
    return int(len(scene.points(colour=colour, shape=shape)))


def sample_prompt(
    rng: np.random.Generator,
    colour: str,
    shape: str,
    shape_only_prob: float = 0.25,
    singular_prob: float = 0.2,
) -> str:
    """A random wording that refers to the class (colour, shape): with or without the colour,
    plural or singular. The shape-only form refers to every colour of that shape."""
    use_colour = rng.random() >= shape_only_prob
    plural = rng.random() >= singular_prob
    return format_prompt(colour if use_colour else None, shape, plural=plural)


def differs_in_one_attribute(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """True when two classes share exactly one of colour and shape ("red stars" vs "blue stars")."""
    return (a[0] == b[0]) != (a[1] == b[1])


def hard_negatives(present: Sequence[tuple[str, str]], pool: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Classes of `pool` absent from `present` that differ from a present class in exactly one
    attribute (same shape in another colour, or same colour in another shape): the prompts a model
    that reads only one word of the prompt gets wrong."""
    present_set = set(present)
    return [c for c in pool if c not in present_set and any(differs_in_one_attribute(c, p) for p in present_set)]
