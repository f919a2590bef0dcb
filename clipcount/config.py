"""All configuration of clipcount in one place, as plain dataclasses.

Every component reads its settings from one of these; nothing reads globals. Configs round-trip
through JSON (`to_dict` / `from_dict`) so a checkpoint's config file rebuilds the exact model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from clipcount.errors import ConfigError

# CLIP's image statistics (OpenAI's preprocessing); every CLIP we load was trained with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """A CLIP vision transformer (ViT)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # output of `proj`, the joint image-text space
    layer_norm_eps: float = 1e-5
    # How pixels become tokens. "patch": CLIP's linear patchify (every released CLIP). "conv": a
    # small convolutional stem of the same stride (`modeling.clip.ConvStem`; Xiao et al. 2021,
    # "Early convolutions help transformers see better"), used by the synthetic CPU recipe: its
    # translation-equivariant filters learn the shape of 7-27 px objects in minutes, where the
    # linear patchify learned nothing of shape in 20 CPU minutes. "hybrid": the two summed
    # (`modeling.clip.HybridStem`): the linear patchify keeps each patch's colour, which the conv
    # stem's per-patch features lose as they learn shape (a per-patch probe: 0.90 against 0.76).
    stem: Literal["patch", "conv", "hybrid"] = "patch"

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv", "hybrid"):
            raise ConfigError(f"unknown vision stem {self.stem!r}; choose 'patch', 'conv' or 'hybrid'")
        if self.stem != "patch" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"a conv stem halves the image per stage: the patch size must be a power of 2, "
                              f"got {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """A CLIP text transformer (causal)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    # OpenAI's CLIP and most OpenCLIP "openai" models use x*sigmoid(1.702x); OpenCLIP's own use GELU.
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"

    def __post_init__(self) -> None:
        self.vision.embed_dim = self.embed_dim


@dataclass
class PromptConfig:
    """Deep visual prompt tuning (VPT) in the frozen ViT and CoOp-style text context."""

    visual_tokens: int = 20  # prompt tokens inserted after the class token
    visual_layers: int = 10  # prompted layers (0 = no visual prompts; 1 = shallow VPT)
    visual_dropout: float = 0.1
    text_context_tokens: int = 2  # learnable tokens right after the start-of-text token


@dataclass
class InteractionConfig:
    """Hierarchical patch-text interaction: block k runs at (grid * 2**k) resolution."""

    scales: int = 2
    width: int = 512
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class DecoderConfig:
    channels: tuple[int, ...] = (256, 128, 64, 32)
    groups: int = 8
    # The published code ends in a sigmoid, which caps density at 1 per pixel although a sigma-1
    # Gaussian of mass 60 peaks near 9.5; our default is uncapped and linear ("identity"). Not ReLU:
    # under MSE on mostly-zero targets a ReLU output dies within the first few steps (measured on
    # tiny and ViT-B/16 models). Not softplus either: its slow tail towards 0 starves the gradient
    # where most pixels are (background), so a short run learns nothing (measured, small synthetic
    # budget, 450 steps: NAE 0.83 with softplus vs 0.43 linear against 0.77 for the training mean;
    # one fixed batch fitted in ~25 steps linear, ~175 softplus). A linear map may dip slightly below
    # 0 on background; counts are floored at 0 (DensityPredictor.count) and pictures clip it.
    activation: Literal["relu", "softplus", "sigmoid", "identity"] = "identity"


@dataclass
class ClipCountConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    window_size: int = 384  # the model sees square windows of this many pixels
    # Images are resized to this height before being cut into windows (None: the window size, the
    # published protocol: one row of windows). A window smaller than the image height keeps more
    # pixels per object at the same cost per window: a 256 window of an image at 384 sees objects
    # 1.5x larger than a 384 window viewed at 256, and the windows tile the image in rows and columns.
    image_height: int | None = None
    density_scale: float = 60.0  # count = density.sum() / density_scale
    # Resizing 384 -> 224 without antialiasing aliases fine texture; the published code did so.
    antialias: bool = True
    # Fine-tune CLIP's image tower too (an ablation; CLIP-Count keeps it frozen).
    train_image_encoder: bool = False
    # Reproduce the published code's behaviour (end-of-text index, prompt-layer indexing, text
    # truncation, sigmoid output, unused parameters). Only for the converted published checkpoint.
    compat: bool = False
    # How whole images are cut into windows and blended back by default (engine/windows.py):
    # "clipcount" (windows end at the border, linear blending) or "published" (the published
    # evaluation's padding and sigmoid blending; converted published checkpoints use it so that
    # their published scores are reproduced). Counting and evaluation can override it.
    windowing: Literal["clipcount", "published"] = "clipcount"
    # Give the decoder the patch-text similarity map (cosine of the contrastive patch features and
    # the text, one extra channel beside each interaction map). The published model's text reaches
    # the patches only through cross-attention to its one text token, where the softmax over one key
    # is 1: every patch gets the same text vector added, whatever it shows. The similarity map is a
    # per-patch answer to "is this what the text names", trained by the contrastive stage. Off in
    # the published model (and by default); ClipCount.maps_from_shared.
    text_similarity: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check_model_settings(self)
        if self.compat:
            self.decoder.activation = "sigmoid"
            self.antialias = False

    @property
    def resize_height(self) -> int:
        """The height images are resized to before they are cut into windows."""
        return self.window_size if self.image_height is None else self.image_height

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClipCountConfig":
        return _from_dict(cls, data)


# ---- presets -----------------------------------------------------------------------------------

def clip_config(name: str) -> CLIPConfig:
    """CLIP architectures by their usual names (ViT-B/16 is CLIP-Count's backbone)."""
    presets = {
        "ViT-B/16": CLIPConfig(VisionConfig(patch_size=16, width=768, layers=12, heads=12), TextConfig(), 512),
        "ViT-B/32": CLIPConfig(VisionConfig(patch_size=32, width=768, layers=12, heads=12), TextConfig(), 512),
        "ViT-L/14": CLIPConfig(
            VisionConfig(patch_size=14, width=1024, layers=24, heads=16),
            TextConfig(width=768, layers=12, heads=12),
            768,
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown CLIP architecture {name!r}; choose one of {sorted(presets)}")
    return presets[name]


def tiny_config(compat: bool = False) -> ClipCountConfig:
    """A few-thousand-parameter model with the full structure, for tests."""
    clip = CLIPConfig(
        VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2),
        TextConfig(context_length=77, width=32, layers=2, heads=2),
        embed_dim=16,
    )
    return ClipCountConfig(
        clip=clip,
        prompts=PromptConfig(visual_tokens=3, visual_layers=2, text_context_tokens=2),
        interaction=InteractionConfig(scales=2, width=16, heads=2),
        decoder=DecoderConfig(channels=(16, 8, 8, 8), groups=4),
        window_size=64,
        compat=compat,
    )


# ---- training and evaluation ------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Two-stage training; the defaults are the published recipe."""

    contrastive_epochs: int = 20
    density_epochs: int = 180
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    lr_decay: float = 0.33  # multiply the learning rate by this ...
    lr_decay_every: int = 100  # ... every this many epochs
    contrastive_weight: float = 1.0  # weight of the contrastive loss in the contrastive stage
    contrastive_weight_stage2: float = 0.0  # ... and beside the density loss afterwards (published: 0)
    contrastive_temperature: float = 0.07
    density_sigma: float = 1.0
    mosaic_prob: float = 0.3
    augment_prob: float = 0.2
    # Prompts per training image (1 = published). Each image is encoded once for all of them. The
    # first prompt names an annotated class; each further one names a class absent from the image
    # (all-zero target) with probability `negative_share`, else another annotated class (datasets
    # with one class per image repeat it). A share `hard_negative_share` of the negatives are hard:
    # in the synthetic world a class differing from a present one in exactly one attribute, in a
    # dataset the class names nearest the image's own by text embedding. On FSC-147 a class named
    # by another image may be present but unannotated in this one, so keep the share moderate.
    prompts_per_image: int = 1
    negative_share: float = 0.0
    hard_negative_share: float = 0.5
    # Chance that a training item is a background crop instead: a square of its image that holds no
    # annotated object, resized to the window, with an all-zero target (data/background.py). Without
    # any, a few images whose every crop holds objects never show what "none here" looks like.
    # In the synthetic recipe: a crop of background alone (`synthetic.stream.blank_crop`).
    background_share: float = 0.0
    # Weight of a count loss beside the density MSE in the density stage (`engine.losses.
    # count_mse_loss`: (predicted - true count)^2 per image and prompt): the density MSE cannot see
    # a uniform floor of density that adds objects to every window. Counts errors of ~7 objects
    # weigh about as much as a density MSE of 1.5e-4 at 3e-6. 0 = the published MSE alone; at 3e-6
    # a half-budget synthetic run leaked other classes into each count (README), so no preset uses it.
    count_weight: float = 0.0
    # Weight of the squared predicted count of pairs with nothing to count (negative prompts, blank
    # crops; `engine.losses.empty_count_loss`) beside the density MSE, which barely sees diffuse mass:
    # at 1e-5, in batches of 32 pairs of 256-pixel windows with 13 empty ones, it pushes a diffuse
    # floor down ~30x harder than the MSE does and a concentrated false object ~20x less hard.
    # 0 = off (published).
    empty_count_weight: float = 0.0
    num_workers: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = 500  # steps
    log_every: int = 10
    seed: int = 0
    max_steps: int | None = None  # stop early (smoke runs)
    # Stop once this many seconds of training have passed (summed over resumed calls): a run sized
    # from a measured rate still honours its time budget when the machine slows down. The epoch
    # then in progress is cut short.
    max_seconds: float | None = None
    # Exponential moving average of the trainable weights (engine/weight_average.py), saved as the
    # final model; 0 = none (published). ~1 / (1 - decay) steps are averaged.
    ema_decay: float = 0.0


# What `clipcount train --init CKPT` changes in TrainConfig's published from-scratch recipe. A trained
# model needs no contrastive warm-up (its patches already match text), and a few images need far
# fewer epochs (an epoch of 3 images is one step). The density output layer starts afresh and linear
# (see fresh_head in cli/train.py): a saturating output kept from the checkpoint (an earlier demo model's
# softplus, the published sigmoid) learns background 0 only through a vanishing gradient, and a
# short fine-tune then leaves a diffuse floor that adds tens of objects to every image. Even a linear
# output keeps such a floor when every training crop holds objects (a few images, each resized to the
# window, so the crop is the whole image): nothing shows it what "none here" looks like, and a
# short run learns the images' mean level before it learns where the objects are. So a quarter of
# the crops are background crops (data/background.py), the learning rate is the one the demo model
# was trained with, and there are 200 epochs (of a few images: 200 steps). Measured by
# benchmarks/finetune.py (6 tiles, so 1 step an epoch), an empty black tile counted 141 after 50
# steps at lr 3e-4 without background crops, 138 at lr 1e-3 alone, 88 with background crops alone,
# 5 with both; held-out MAE with both: 128 after 50 steps, 118 after 100, 112 after 200 (115 for
# answering the training mean). The image
# tower's visual prompts stay as trained (cli/train.py, --tune-prompts to train them): the backward
# pass then stops before CLIP's image tower, about 3x cheaper a step, and a few images cannot
# re-learn what the prompts learned from many.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "contrastive_epochs": 0,
    "density_epochs": 200,
    "lr": 1e-3,  # a fresh output layer must reach the new data's density level within few steps
    "background_share": 0.25,  # crops of empty background, all-zero targets (see above)
    "lr_decay_every": 1000,  # no decay within a fine-tune
    "mosaic_prob": 0.0,  # few images: a mosaic of them repeats the same objects
    "checkpoint_every": 50,
}


@dataclass
class EvalConfig:
    window_stride: int = 128
    image_height: int = 384
    batch_windows: int = 64  # windows per forward pass


# ---- validation: a config that cannot build a working model is refused when it is made ------------

def check_types(config: Any, prefix: str = "") -> None:
    """Every setting of `config` (nested too) holds a value of its annotated type, or ConfigError
    names the setting, e.g. "interaction.heads = 'four' is not a whole number"."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value, name = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_types(value, f"{name}.")
        elif not _is_instance(value, hints[item.name]):
            raise ConfigError(f"setting {name} = {value!r} is not {_describe(hints[item.name])}")


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(kinds) == len(value) and all(_is_instance(v, k) for v, k in zip(value, kinds))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}s" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if dataclasses.is_dataclass(hint):
        return "a group of settings ({...})"
    return names.get(hint, str(hint))


def _check_model_settings(config: "ClipCountConfig") -> None:
    """Values of the right type that still cannot build a model: sizes, head splits, group splits."""
    vision, text, interaction = config.clip.vision, config.clip.text, config.interaction
    positive = {
        "clip.vision.image_size": vision.image_size, "clip.vision.patch_size": vision.patch_size,
        "clip.vision.width": vision.width, "clip.vision.layers": vision.layers, "clip.vision.heads": vision.heads,
        "clip.text.context_length": text.context_length, "clip.text.vocab_size": text.vocab_size,
        "clip.text.width": text.width, "clip.text.layers": text.layers, "clip.text.heads": text.heads,
        "clip.embed_dim": config.clip.embed_dim, "interaction.scales": interaction.scales,
        "interaction.width": interaction.width, "interaction.heads": interaction.heads,
        "interaction.mlp_ratio": interaction.mlp_ratio, "decoder.groups": config.decoder.groups,
        "window_size": config.window_size, "density_scale": config.density_scale,
        **{f"decoder.channels[{i}]": c for i, c in enumerate(config.decoder.channels)},
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"setting {name} = {value!r} must be positive")
    if config.image_height is not None and config.image_height < config.window_size:
        raise ConfigError(f"setting image_height = {config.image_height} must be at least the window size "
                          f"{config.window_size} (or None: the window size)")
    if config.resize_height != config.window_size and config.windowing == "published":
        raise ConfigError("the published windowing cuts one row of windows, so it needs image_height = None "
                          f"(the window size), not {config.image_height}")
    for name in ("visual_tokens", "visual_layers", "text_context_tokens"):
        if getattr(config.prompts, name) < 0:
            raise ConfigError(f"setting prompts.{name} = {getattr(config.prompts, name)} must be 0 or more")
    for part, sub in (("clip.vision", vision), ("clip.text", text), ("interaction", interaction)):
        if sub.width % sub.heads:
            raise ConfigError(f"setting {part}.heads = {sub.heads} does not divide {part}.width = {sub.width}; "
                              f"use a divisor such as {_divisor_near(sub.width, sub.heads)}")
    for i, channels in enumerate(config.decoder.channels):
        if channels % config.decoder.groups:
            raise ConfigError(f"setting decoder.groups = {config.decoder.groups} does not divide "
                              f"decoder.channels[{i}] = {channels}")
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"setting clip.vision.patch_size = {vision.patch_size} does not divide "
                          f"clip.vision.image_size = {vision.image_size}")
    if interaction.scales > len(config.decoder.channels):
        raise ConfigError(f"setting interaction.scales = {interaction.scales} needs at least as many "
                          f"decoder.channels (has {len(config.decoder.channels)})")
    if config.prompts.visual_layers > vision.layers:
        raise ConfigError(f"setting prompts.visual_layers = {config.prompts.visual_layers} is more than "
                          f"clip.vision.layers = {vision.layers}")
    if config.compat and config.text_similarity:
        raise ConfigError("setting text_similarity = true has no place in a published (compat) model, which has no "
                          "similarity channel; turn one of them off")


def _divisor_near(width: int, heads: int) -> int:
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - heads), d))


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild nested dataclasses from `asdict` output; unknown keys are an error, not a silent drop."""
    if not isinstance(data, dict):
        raise ConfigError(f"setting {prefix.rstrip('.') or 'config'} = {data!r} is not a group of settings ({{...}})")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + str(key) for key in sorted(unknown, key=str))}")
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        sub = _NESTED.get((cls.__name__, key))
        if sub is not None:
            kwargs[key] = _from_dict(sub, value, f"{prefix}{key}.")
        elif isinstance(value, list) and "tuple" in str(hints[key]):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NESTED = {
    ("CLIPConfig", "vision"): VisionConfig,
    ("CLIPConfig", "text"): TextConfig,
    ("ClipCountConfig", "clip"): CLIPConfig,
    ("ClipCountConfig", "prompts"): PromptConfig,
    ("ClipCountConfig", "interaction"): InteractionConfig,
    ("ClipCountConfig", "decoder"): DecoderConfig,
}
