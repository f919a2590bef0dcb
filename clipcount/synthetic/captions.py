"""Captions for contrastive (CLIP-style) pretraining on synthetic scenes.

A caption names the classes in a scene with rough or exact counts ("a few red circles and many
blue squares", "3 green stars"), so the text encoder learns colours, shapes and quantities. Only
training classes are ever named: a scene holding a held-out class is refused, because the
pretrained encoder must not have seen those classes in pixels or in text.
"""

from __future__ import annotations

import numpy as np

from clipcount.errors import DataError
from clipcount.synthetic.prompts import ALL_CLASSES, HELD_OUT, TRAIN_CLASSES, format_prompt
from clipcount.synthetic.world import Scene

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve")
_TEMPLATES = (
    "{}",
    "a picture of {}",
    "an image with {}",
    "a scene with {}",
    "{} on a textured background",
    "there are {}",
    "a photo of {}",
)


def _rough(n: int, rng: np.random.Generator) -> str:
    """A vague quantity for n >= 2 (the caller handles n == 1)."""
    if n <= 4:
        options = ("a few", "some", "a couple of" if n == 2 else "a few")
    elif n <= 12:
        options = ("several", "some", "a handful of")
    elif n <= 40:
        options = ("many", "lots of", "plenty of")
    elif n <= 100:
        options = ("dozens of", "many", "lots of")
    else:
        options = ("hundreds of" if n >= 200 else "over a hundred", "a huge number of", "a crowd of")
    return options[int(rng.integers(len(options)))]


def count_phrase(n: int, colour: str, shape: str, rng: np.random.Generator) -> str:
    """"3 green stars", "three green stars", "a few green stars", "one green star", ..."""
    if n == 1:
        lead = ("a", "one", "a single", "1")[int(rng.integers(4))]
        return f"{lead} {format_prompt(colour, shape, plural=False)}"
    style = rng.random()
    if style < 0.4 or (style < 0.7 and n >= len(_NUMBER_WORDS)):
        lead = str(n)  # exact digits
    elif style < 0.7:
        lead = _NUMBER_WORDS[n]
    else:
        lead = _rough(n, rng)
    return f"{lead} {format_prompt(colour, shape, plural=True)}"


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every class in `scene` with a count, in random order and wording.

    Raises DataError if the scene holds a held-out class (make pretraining scenes with
    WorldConfig(mode="train"))."""
    counts = scene.class_counts()
    leaked = sorted(c for c in counts if c in HELD_OUT)
    if leaked:
        names = ", ".join(format_prompt(c, s) for c, s in leaked)
        raise DataError(
            f"this scene contains held-out classes ({names}); captions for pretraining are only "
            "made from WorldConfig(mode='train') scenes"
        )
    if not counts:
        return ("an empty background", "a background with no shapes", "no objects")[int(rng.integers(3))]
    classes = sorted(counts)
    order = rng.permutation(len(classes))
    phrases = [count_phrase(counts[classes[i]], *classes[i], rng) for i in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(body)


def all_class_prompts(include_held_out: bool = False) -> list[str]:
    """The plural "<colour> <shape>" prompt of every class, colours then shapes in vocabulary order;
    held-out classes only when asked for (e.g. to score zero-shot retrieval)."""
    classes = ALL_CLASSES if include_held_out else TRAIN_CLASSES
    return [format_prompt(c, s) for c, s in classes]
