"""Recipe presets: everything one run of the synthetic recipe is made of (see `recipe.py`).

    cpu         the bundled demo model's recipe: 2 CPU cores, at most 60 minutes of wall time
    cpu-patch   the recipe bundled before session 6: the same with CLIP's linear patchify, no stage 0
    cpu-stem    the same with a convolutional stem alone (an experiment)
    full        sized for one GPU with 16 CPU cores
    small       proves every stage runs on 2 CPU cores in under 20 minutes (it will not count well)
    toy         seconds, for tests

Budgets are optimizer steps, or seconds (`time_budget`, `pretrain.time_budget_s`) turned into
steps on the machine at hand and recorded in the run's recipe.json.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from clipcount.config import (
    CLIPConfig,
    ClipCountConfig,
    DecoderConfig,
    InteractionConfig,
    PromptConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from clipcount.errors import ConfigError
from clipcount.synthetic.pretrain import PretrainConfig
from clipcount.synthetic.world import WorldConfig

TEST_SEED = 10_000_000  # benchmark scenes; training uses the preset's small seeds
# Target density maps are blurred with sigma 2 px, not the published 1 px: the decoder's finest
# stage is at half the window's resolution, where a 1 px Gaussian cannot be drawn, and the squared
# error would mostly measure peaks it cannot reach rather than counts. Sums (counts) are the same.
DENSITY_SIGMA = 2.0
# One training prompt in five names a class that is absent from the crop but shares its colour or
# shape with one present: without such prompts a model is rewarded for counting whatever is there,
# and the first bundled model counted the dominant class of the prompt-fidelity scenes.
ABSENT_PROB = 0.2
# What makes the prompt matter, shared by the bundled `cpu` recipe and the GPU `full` one: four prompts
# per crop, 40% of the further ones absent classes (zero targets), most of those one attribute off;
# a fifth of the crops blank. And the world they train in: shapes 10-40 px, up to 40 per class.
FIDELITY_TRAINING = {"prompts_per_image": 4, "negative_share": 0.4, "hard_negative_share": 0.6}
BLANK_SHARE = 0.2
FIDELITY_WORLD = {"max_width": 768, "min_size": 10.0, "max_size": 40.0, "max_per_class": 40}
# The bundled and GPU recipes save the moving average of their CLIP-Count weights over about the last
# 500 steps (TrainConfig.ema_decay): the raw weights of the last step were measured 3 objects too low
# on seen classes in one run and unbiased in the same run averaged (README, session 9).
WEIGHT_AVERAGE = 0.998
# Ablations the recipe knows (each one change against the main model, at one shared budget).
ABLATIONS = ("no_contrastive", "one_scale", "no_visual_prompts", "single_prompt", "no_hard_negatives")
REFERENCE = "full_same_budget"  # the full recipe at the ablations' budget, when it differs from main's


# ---- presets --------------------------------------------------------------------------------------

@dataclass
class Preset:
    """Everything a recipe run is made of. Budgets are optimizer steps, or seconds (`time_budget`,
    `pretrain.time_budget_s`) turned into steps on the machine at hand and recorded in recipe.json."""

    name: str
    clip: CLIPConfig
    pretrain: PretrainConfig
    model: ClipCountConfig  # its `clip` is replaced by the pretrained CLIP's config
    train: TrainConfig  # the main model's training (epochs of `steps_per_epoch` steps)
    steps_per_epoch: int
    crops_per_scene: int = 2
    absent_prob: float = 0.0  # share of training prompts naming a similar class absent from the crop
    ablation_steps_per_epoch: int | None = None  # None: the main model's budget
    ablation_workers: int | None = None  # data workers per ablation process (None: share the cores)
    concurrent_ablations: bool | None = None  # None: on CUDA only
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides for training
    bench_world: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides for test scenes
    # Seconds of training for "main" and "ablations": steps per epoch are then chosen from the step
    # rate measured on this machine (recorded in recipe.json); None: the fixed steps above.
    time_budget: dict[str, float] | None = None
    ablations: tuple[str, ...] = ABLATIONS[:3]  # which of ABLATIONS this preset trains
    bench_n: int = 200
    bench_seed: int = TEST_SEED
    bench_stride: int = 128
    train_mean_n: int = 500
    zero_shot_n: int = 120

    def __post_init__(self) -> None:
        self.ablations = tuple(self.ablations)  # JSON gives lists
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ConfigError(f"unknown ablations {sorted(unknown)}; choose from {', '.join(ABLATIONS)}")
        # training crops are cut from scenes as drawn, test images are resized to the model's image
        # height: the two scales agree only when the scenes are drawn at that height
        height = self.world_config().height
        if height != self.model.resize_height:
            raise ConfigError(f"preset {self.name!r}: the world draws scenes {height} pixels tall but the model "
                              f"resizes images to {self.model.resize_height}; make them agree")

    def world_config(self) -> WorldConfig:
        return WorldConfig(**{**self.world, "mode": "train"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_sized(vision: VisionConfig) -> tuple[CLIPConfig, ClipCountConfig]:
    """The CPU presets' CLIP and CLIP-Count around an image tower: they differ only in the tower."""
    clip = CLIPConfig(vision, TextConfig(context_length=32, width=64, layers=2, heads=2), embed_dim=64)
    model = ClipCountConfig(
        clip=clip,
        prompts=PromptConfig(visual_tokens=4, visual_layers=3, text_context_tokens=2),
        interaction=InteractionConfig(scales=2, width=64, heads=2),
        decoder=DecoderConfig(channels=(32, 16, 16, 8), groups=4),
    )
    return clip, model


CPU_PRESET_NAMES = {"hybrid": "cpu", "patch": "cpu-patch", "conv": "cpu-stem"}


def cpu_preset(stem: str = "hybrid") -> Preset:
    """The bundled model's recipe: 2 CPU cores, at most 60 minutes of wall time in all.

    20 minutes of CLIP pretraining: 7 minutes of stage 0, where the image tower's stem (a conv stem
    summed with CLIP's linear patchify, `modeling.clip.HybridStem`) learns the shape and colour of
    object-centred crops (`stem.py`), then 13 minutes on scene captions *and* region-level signal
    (every patch learns what covers it) with the stem frozen. Then 35 minutes of CLIP-Count with
    four prompts per crop (present classes with their own maps, 40% absent classes with zero
    targets, most of them one attribute off) and 20% blank crops (background only, zero targets:
    without them a density floor of ~1e-5 objects per pixel added up to ~4 objects per blank
    image); CLIP's image tower is fine-tuned with the rest, the decoder sees the patch-text
    similarity map, and the saved model is the moving average of the last ~500 steps' weights; then
    the benchmark. Stage 0 gets data workers of its
    own and one main thread (it waits on drawing scenes); stages 1-3 run under bf16 autocast where
    the CPU has native bf16. CLIP is
    pretrained on 384-pixel crops shown at 256 pixels; CLIP-Count sees 256-pixel windows of images
    384 tall at full resolution (16 image pixels per patch; a 16x16 patch grid, interaction at 16x16
    and 32x32), so counting an image takes about 2.5x the windows of one 384-pixel row.
    Time budgets become step counts from the rate measured on the machine at hand.

    The earlier recipes, kept so their numbers in the README can be reproduced: `stem="patch"`
    ("cpu-patch", the model bundled before session 6: linear patchify, no stage 0; its patches never
    learned shape) and `stem="conv"` ("cpu-stem": a conv stem alone, whose patches learned shape but
    lost colour). Both keep the settings they were measured with: float32 on a CPU, no blank crops, one stage-0
    data worker, 30 minutes of CLIP-Count.
    """
    from clipcount.engine.inference import cpu_has_native_bf16

    vision = VisionConfig(image_size=256, patch_size=16, width=128, layers=4, heads=4, stem=stem)
    clip, model = _cpu_sized(vision)
    # sigma 4 px: the decoder's finest map is a third of the window here (128 px for 384), where a
    # 2 px Gaussian is under one pixel wide; counts (the sums) do not depend on it.
    train = TrainConfig(contrastive_epochs=1, density_epochs=5, batch_size=8, lr=1e-3, lr_decay_every=4,
                        density_sigma=4.0, num_workers=1, checkpoint_every=100, log_every=10,
                        mosaic_prob=0.0, augment_prob=0.0, **FIDELITY_TRAINING)
    world = dict(FIDELITY_WORLD)
    stage_zero = {"time_budget_s": 780.0, "stem_steps": 20000, "stem_time_budget_s": 420.0} if stem != "patch" else {}
    main_seconds = 1800.0
    if stem == "hybrid":  # the bundled recipe; the earlier ones keep the settings their README numbers came from
        # bf16 autocast where the CPU has it natively: 1.25x the steps of float32 on these 2 cores
        # (CLIP-Count 1.31 vs 1.05 steps/s, CLIP pretraining 1.09 vs 0.86)
        precision = "bf16" if cpu_has_native_bf16() else "auto"
        # the learning rate drops after 3 of 6 epochs, not 4 (seen NAE 0.195 and 0.275 with two seeds
        # on one CLIP, against 0.275 before: within run-to-run spread; README)
        train = dataclasses.replace(train, background_share=BLANK_SHARE, precision=precision, lr_decay_every=3,
                                    ema_decay=WEIGHT_AVERAGE)
        # the decoder sees the patch-text similarity map (ClipCountConfig.text_similarity; README, session 9);
        # 256-pixel windows of images 384 tall (16 image pixels per patch, not 24) and CLIP's image
        # tower fine-tuned with the rest: seen NAE 0.165 -> 0.091, absent 1.34 -> 0.23 (README, session 10)
        model = dataclasses.replace(model, text_similarity=True, window_size=256, image_height=384,
                                    train_image_encoder=True)
        # stage 0 waits on drawing scenes: more workers, one main thread (pretrain.PretrainConfig)
        stage_zero.update(stem_workers=_cores() + 1, stem_threads=1, precision=precision)
        main_seconds = 2000.0  # calibration fills it (each stage at its own rate); ~58 minutes in all
    pretrain = PretrainConfig(steps=20000, batch_size=32, lr=1e-3, warmup_steps=30, num_workers=1,
                              checkpoint_every=100, log_every=10, time_budget_s=1200.0, calibration_steps=15,
                              region_weight=1.0)
    return Preset(
        name=CPU_PRESET_NAMES[stem], clip=clip, model=model, train=train, steps_per_epoch=300, world=world,
        ablations=(), pretrain=dataclasses.replace(pretrain, **stage_zero),
        bench_n=100, train_mean_n=300, zero_shot_n=60,
        time_budget={"main": main_seconds, "ablations": 600.0},
    )


def small_preset() -> Preset:
    """2 CPU cores, under 20 minutes: proves every stage runs (a 192-pixel view cannot count 8 px shapes).

    Sized by time like the full preset (150 s of CLIP pretraining, 240 s for the main model, 240 s
    for the four ablation-stage models one after another), so a slower or busier machine trains
    fewer steps rather than taking longer.
    """
    clip, model = _cpu_sized(VisionConfig(image_size=192, patch_size=16, width=96, layers=4, heads=3))
    train = TrainConfig(contrastive_epochs=1, density_epochs=3, batch_size=8, lr=5e-4, lr_decay_every=3,
                        density_sigma=DENSITY_SIGMA, num_workers=1, checkpoint_every=100, log_every=10,
                        mosaic_prob=0.0, augment_prob=0.0)
    return Preset(
        name="small", clip=clip, model=model, train=train, steps_per_epoch=60, absent_prob=ABSENT_PROB,
        pretrain=PretrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=30, num_workers=1,
                                checkpoint_every=50, log_every=10, time_budget_s=150.0, calibration_steps=15),
        ablation_steps_per_epoch=25, concurrent_ablations=False,
        world={"max_width": 640}, bench_n=24, train_mean_n=200, zero_shot_n=60,
        time_budget={"main": 240.0, "ablations": 240.0},
    )


def full_preset() -> Preset:
    """The GPU recipe: one H100/H200 and 16 CPU cores, about 10 minutes of wall time. Untested on a
    GPU since stage 0 and the prompt-fidelity training exist (none was lent); every stage runs the
    code the `cpu` preset runs, at larger sizes.

    The model sees each 384-pixel window at full resolution (patch 16: a 24x24 grid, five layers,
    the interaction at 24x24 and 48x48), so 8-pixel shapes keep their outline. Weights: about 7.4M
    parameters, 15 MB in float16 (the 49408-token embedding is 3.2M of them at text width 64).
    Like `cpu`: a hybrid stem trained first on object crops (stage 0, which waits on drawing scenes,
    so it gets every data worker), region-level CLIP pretraining, four prompts per crop with absent
    and one-attribute-off classes, a fifth of the crops blank, the image tower fine-tuned, the
    similarity channel and the averaged weights.

    Training is sized by time (120 s of stage 0, 120 s of CLIP pretraining, 300 s for the main
    model, 60 s for the ablation-stage models together): the step counts are chosen from throughput
    measured at the start of each stage and recorded in recipe.json. The step counts below are
    upper bounds.
    """
    workers = max(1, _cores() - 2)
    clip = CLIPConfig(
        VisionConfig(image_size=384, patch_size=16, width=192, layers=5, heads=3, stem="hybrid"),
        TextConfig(context_length=32, width=64, layers=3, heads=2),
        embed_dim=128,
    )
    model = ClipCountConfig(
        clip=clip,
        prompts=PromptConfig(visual_tokens=10, visual_layers=4, text_context_tokens=2),
        interaction=InteractionConfig(scales=2, width=128, heads=4),
        decoder=DecoderConfig(channels=(64, 32, 16, 16), groups=8),
        text_similarity=True,
        train_image_encoder=True,
    )
    train = TrainConfig(contrastive_epochs=1, density_epochs=5, batch_size=32, lr=4e-4, lr_decay_every=4,
                        density_sigma=DENSITY_SIGMA, num_workers=workers, checkpoint_every=500, log_every=25,
                        mosaic_prob=0.0, augment_prob=0.0, background_share=BLANK_SHARE, ema_decay=WEIGHT_AVERAGE,
                        **FIDELITY_TRAINING)
    pretrain = PretrainConfig(steps=8000, batch_size=256, lr=5e-4, warmup_steps=60, crops_per_scene=3,
                              num_workers=workers, checkpoint_every=200, log_every=25, time_budget_s=120.0,
                              calibration_steps=60, region_weight=1.0, stem_steps=40000, stem_time_budget_s=120.0,
                              stem_workers=workers + 1)
    return Preset(
        name="full", clip=clip, model=model, train=train, steps_per_epoch=600, crops_per_scene=3,
        pretrain=pretrain, ablation_steps_per_epoch=150, ablation_workers=max(1, (workers - 1) // 4),
        world=dict(FIDELITY_WORLD),
        bench_n=100, train_mean_n=600, zero_shot_n=180,
        time_budget={"main": 300.0, "ablations": 60.0},
    )


def toy_preset() -> Preset:
    """Seconds: a few steps of tiny models on small scenes (128-pixel windows), for tests."""
    clip = CLIPConfig(
        VisionConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2, stem="conv"),
        TextConfig(context_length=32, width=32, layers=1, heads=2),
        embed_dim=32,
    )
    model = ClipCountConfig(
        clip=clip,
        prompts=PromptConfig(visual_tokens=2, visual_layers=1, text_context_tokens=2),
        interaction=InteractionConfig(scales=2, width=16, heads=2),
        decoder=DecoderConfig(channels=(16, 8, 8, 8), groups=4),
        window_size=128,
    )
    train = TrainConfig(contrastive_epochs=1, density_epochs=1, batch_size=4, lr=1e-3, num_workers=0,
                        checkpoint_every=100, log_every=1, mosaic_prob=0.0, augment_prob=0.0, prompts_per_image=2,
                        negative_share=0.5)
    world = {"height": 128, "min_width": 128, "max_width": 224, "min_size": 6.0, "max_size": 24.0,
             "max_per_class": 20}
    return Preset(
        name="toy", clip=clip, model=model, train=train, steps_per_epoch=2,
        pretrain=PretrainConfig(steps=3, batch_size=8, warmup_steps=1, crop_size=128, num_workers=0,
                                checkpoint_every=2, log_every=1, region_weight=1.0, stem_steps=2),
        concurrent_ablations=False, world=world, bench_world=world, bench_n=2, train_mean_n=8, zero_shot_n=4,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "cpu": cpu_preset, "cpu-patch": lambda: cpu_preset(stem="patch"), "cpu-stem": lambda: cpu_preset(stem="conv"),
    "full": full_preset, "small": small_preset, "toy": toy_preset,
}


def get_preset(preset: str | Preset, time_scale: float = 1.0) -> Preset:
    """A preset by name; `time_scale` multiplies its time budgets (e.g. 0.8 on a tighter slot)."""
    if not isinstance(preset, Preset):
        if preset not in PRESETS:
            raise ConfigError(f"unknown recipe preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]()
    if time_scale != 1.0:
        if not time_scale > 0:
            raise ConfigError(f"the time scale must be positive, got {time_scale}")
        preset = copy.deepcopy(preset)
        if preset.pretrain.time_budget_s:
            preset.pretrain.time_budget_s *= time_scale
        if preset.time_budget:
            preset.time_budget = {k: v * time_scale for k, v in preset.time_budget.items()}
    return preset
