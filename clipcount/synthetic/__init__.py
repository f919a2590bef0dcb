"""A procedural counting world: coloured shapes on varied backgrounds, every object annotated.

No pretrained CLIP or counting dataset is needed: scenes are generated from a seed, prompts name a
colour and shape ("red triangles") or a shape ("triangles"), and six colour-shape classes
(`HELD_OUT`) are never generated for training, so counting them tests zero-shot composition.
`make_dataset` writes scenes in the FSC-147 file layout for the regular readers and trainers.
"""

from clipcount.synthetic.captions import all_class_prompts, caption_for
from clipcount.synthetic.dataset import WrittenSplit, add_cli, make_dataset
from clipcount.synthetic.prompts import (
    ALL_CLASSES,
    COLOURS,
    HELD_OUT,
    SHAPE_PLURALS,
    SHAPES,
    TRAIN_CLASSES,
    count_for_prompt,
    format_prompt,
    is_held_out,
    parse_prompt,
    sample_prompt,
)
from clipcount.synthetic.world import (
    TEST_KINDS,
    Scene,
    SceneObject,
    WorldConfig,
    make_fidelity_scene,
    make_held_out_scene,
    make_scene,
    make_seen_scene,
    make_test_example,
    sample_training_example,
)

__all__ = [
    "ALL_CLASSES",
    "COLOURS",
    "HELD_OUT",
    "SHAPES",
    "SHAPE_PLURALS",
    "TEST_KINDS",
    "TRAIN_CLASSES",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "WrittenSplit",
    "add_cli",
    "all_class_prompts",
    "caption_for",
    "count_for_prompt",
    "format_prompt",
    "is_held_out",
    "make_dataset",
    "make_fidelity_scene",
    "make_held_out_scene",
    "make_scene",
    "make_seen_scene",
    "make_test_example",
    "parse_prompt",
    "sample_prompt",
    "sample_training_example",
]
