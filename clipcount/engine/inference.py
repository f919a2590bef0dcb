"""Inference on whole images: windows batched together, the image encoded once for all prompts,
text embeddings cached. Everything that counts (the API, the CLI, evaluation) goes through here.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from clipcount.engine.windows import WINDOWINGS, merge_windows, plan_windows, resize_to_height, split_windows
from clipcount.modeling.clip import MLP, MultiheadSelfAttention
from clipcount.modeling.clip_count import ClipCount, check_prompts
from clipcount.modeling.interaction import FeedForward, SelfAttention


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: AVX512-BF16 dot products, AMX tiles.
# Without them torch emulates bf16 in float32 registers, slower than plain float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (any of BF16_CPU_FLAGS); False where
    /proc/cpuinfo cannot be read (macOS, Windows): `auto` then stays float32."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the whole model (None: no autocast).

    `bf16`: everything but the density head in bf16; `auto`: the same on a GPU, and no autocast on
    a CPU, where `auto` runs only some layers' matmuls in bf16 (pick_bf16_modules)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")


# `auto` on a CPU with native bf16: some modules (paths, a regular expression) compute in bf16 from
# bf16 weight copies, everything else in float32, and what they hand on is float32 again (layer
# norms, the residual streams; clip.in_weight_dtype). They hold most of the FLOPs: the image
# tower's MLPs (two thirds of its matmuls) and its attention projections (the other third; the
# softmax stays float32) but in the first and last AUTO_ATTENTION_SKIP layers, and the
# interaction's self-attention and MLPs (most of each extra prompt's work). benchmarks/precision.py
# measured the choice (README "Performance"): the attention projections of every layer in bf16
# moved the demo model's counts by up to 0.45% (0.31% without them, 0.33% skipping one layer at
# each end); kept float32 are also the decoder (rounding its convolutions' weights alone moved
# counts 1.6%), the interaction's refining convolution (0.38% with it), the cross-attention to the
# prompt (its value is added to every token alike, so its rounding does not average out) and the
# projection into the interaction. Autocast over the interaction and decoder instead (bf16
# outputs, bf16 residual streams) moved counts 1.45%.
TOWER_BLOCKS = r"clip\.visual\.transformer\.resblocks\."
AUTO_BF16_MODULES = rf"{TOWER_BLOCKS}\d+\.mlp|interaction\.fim_blocks\.\d+\.(selfattn|mlp)"
AUTO_ATTENTION_SKIP = 2


def auto_bf16_modules(layers: int) -> str:
    """`auto`'s bf16 modules (a regular expression of paths) for an image tower of `layers` blocks."""
    middle = "|".join(str(i) for i in range(AUTO_ATTENTION_SKIP, layers - AUTO_ATTENTION_SKIP))
    return AUTO_BF16_MODULES + (rf"|{TOWER_BLOCKS}({middle})\.attn" if middle else "")


def pick_bf16_modules(device: torch.device, precision: str = "auto", layers: int = 12) -> str | None:
    """The modules (a regular expression of paths) whose matmuls run in bf16 without autocast:
    auto_bf16_modules(layers) for `auto` on a CPU with native bf16 (cpu_has_native_bf16), else none."""
    pick_dtype(device, precision)  # rejects unknown precisions
    native = precision == "auto" and device.type == "cpu" and cpu_has_native_bf16()
    return auto_bf16_modules(layers) if native else None


# On a CPU a few windows already keep the matmul units busy (3 windows of ViT-B/16 are 651 token
# rows); larger batches only raise peak memory (activations, allocator and oneDNN caches). The same
# holds for (window, prompt) pairs: 4, 12 or 24 pairs per pass took the same time per pair.
CPU_MAX_BATCH = 4


# Modules the bf16 weight copies of `bf16` leave alone: the text tower (run once per prompt, its
# embeddings cached) and the density head, which runs in float32 (DensityDecoder.forward).
KEEP_WEIGHTS = ("clip.transformer.", "decoder.final_conv.")
CAST_MODULES = (nn.Linear, nn.Conv2d, MultiheadSelfAttention)  # the latter: its packed in_proj
WEIGHT_DTYPE_MODULES = (MLP, MultiheadSelfAttention, FeedForward, SelfAttention)  # clip.in_weight_dtype


def outside(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    """A module-path test: true outside the `prefixes` (paths with a trailing dot)."""
    return lambda path: not f"{path}.".startswith(prefixes)


def within(pattern: str) -> Callable[[str], bool]:
    """A module-path test: true for the modules `pattern` matches in full and for those inside them."""
    compiled = re.compile(rf"(?:{pattern})(?:\..*)?")
    return lambda path: compiled.fullmatch(path) is not None


def channels_last_convolutions(model: nn.Module, under: tuple[str, ...] = ("interaction.", "decoder.")) -> None:
    """Stores the convolution weights `under` these module paths in channels-last order, the order of
    their inputs (the interaction's and decoder's maps): on a CPU oneDNN otherwise reorders a weight
    on every call, a quarter of a 512x512x3x3 convolution's time. Same values, same results."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and f"{path}.".startswith(under):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def check_bf16_modules(model: nn.Module, pattern: str) -> None:
    """bf16 without autocast needs modules that compute in their weights' dtype (clip.in_weight_dtype)."""
    for path, module in model.named_modules():
        if re.fullmatch(pattern, path) and not isinstance(module, WEIGHT_DTYPE_MODULES):
            kinds = ", ".join(kind.__name__ for kind in WEIGHT_DTYPE_MODULES)
            raise ValueError(f"bf16 modules {pattern!r} name {path} ({type(module).__name__}); "
                             f"only these run in bf16 without autocast: {kinds}")


class CastWeights:
    """Low-precision copies of a model's matmul weights (CAST_MODULES), swapped in around a call.

    Autocast casts a float32 weight on every use (it caches casts only of parameters that require
    grad, and only within one autocast region): on a CPU that is a pass over all the ViT's weights
    per batch of windows, a sixth of the time of a bf16 count. The copies are the values autocast
    would cast to (a few products, e.g. QuickGELU's bias x scale, then round in bf16 too: counts
    agree to bf16 rounding); they cost half the swapped weights' memory. `select`: which modules,
    by path (default: all but KEEP_WEIGHTS).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, select: Callable[[str], bool] = outside(KEEP_WEIGHTS)):
        self.slots = [
            (module, name, weight, weight.detach().to(dtype))
            for path, module in model.named_modules()
            if isinstance(module, CAST_MODULES) and select(path)
            for name, weight in module._parameters.items()
            if weight is not None and weight.is_floating_point()
        ]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        for module, name, _, cast in self.slots:
            module._parameters[name] = cast
        try:
            yield
        finally:
            for module, name, original, _ in self.slots:
                module._parameters[name] = original


class DensityPredictor:
    """Counts images of any size with a `ClipCount` model, following the window protocol (images resized
    to the model's image height, 384 for the published model, and cut into its windows).

    `max_batch`: windows (and window-prompt pairs) per forward pass; at most CPU_MAX_BATCH on a CPU.
    `windowing`: "clipcount" or "published" (engine.windows); default: the model's config says
    (converted published checkpoints say "published", to reproduce the published evaluation).
    `precision`: "fp32", "bf16" (autocast) or "auto" (pick_dtype, pick_bf16_modules); on a CPU with
    native bf16 `bf16_modules` replaces auto's modules (a regular expression of module paths, each
    one that computes in its weights' dtype: CLIP's attention or MLP, the interaction's
    self-attention or MLP; "" for none), to measure other choices (benchmarks/precision.py).
    """

    def __init__(self, model: ClipCount, stride: int = 128, max_batch: int = 64,
                 device: str | torch.device | None = None, precision: str = "auto", text_cache_size: int = 1024,
                 windowing: str | None = None, bf16_modules: str | None = None):
        self.windowing = windowing or model.config.windowing
        if self.windowing not in WINDOWINGS:
            raise ValueError(f"unknown windowing {self.windowing!r}; use one of {', '.join(WINDOWINGS)}")
        self.device = pick_device(device)
        self.autocast_dtype = pick_dtype(self.device, precision)
        # without autocast: these modules' matmuls in bf16 (pick_bf16_modules; `bf16_modules` overrides
        # it for `auto` on a CPU with native bf16, e.g. to measure another choice)
        self.bf16_modules = pick_bf16_modules(self.device, precision, len(model.clip.visual.resblocks))
        if self.bf16_modules is not None and bf16_modules is not None:
            self.bf16_modules = bf16_modules
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            channels_last_convolutions(self.model)
        self.stride = stride
        self.max_batch = min(max_batch, CPU_MAX_BATCH) if self.device.type == "cpu" else max_batch
        self.window = model.config.window_size
        self.image_height = model.config.resize_height  # images are resized to it, then cut into windows
        if self.windowing == "published" and self.image_height != self.window:
            raise ValueError(f"the published windowing cuts one row of windows; this model resizes images to "
                             f"{self.image_height} pixels for {self.window}-pixel windows: use windowing 'clipcount'")
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        # bf16 on a CPU: weights cast once here, not on every call (CastWeights)
        self._weights = None
        if self.device.type == "cpu" and self.autocast_dtype is not None:
            self._weights = CastWeights(self.model, self.autocast_dtype)
        elif self.bf16_modules:
            check_bf16_modules(self.model, self.bf16_modules)
            self._weights = CastWeights(self.model, torch.bfloat16, within(self.bf16_modules))

    @property
    def density_scale(self) -> float:
        return self.model.config.density_scale

    def _precision(self):
        """Autocast (`bf16`, and `auto` on a GPU) and the bf16 weight copies (`bf16` and `auto` on a CPU)."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self._weights is not None:
            stack.enter_context(self._weights.swapped())
        return stack

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """P prompts -> (P, 1, E), each prompt encoded once per predictor (LRU cache)."""
        check_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with self._precision():
                encoded = self.model.encode_text(missing)
            for prompt, embedding in zip(missing, encoded):
                self._text_cache[prompt] = embedding
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.inference_mode()
    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) in [0, 1] -> patch tokens (K, N, C), in chunks of `max_batch`."""
        chunks = []
        with self._precision():
            for first in range(0, windows.shape[0], self.max_batch):
                chunk = windows[first : first + self.max_batch].to(self.device, non_blocking=True)
                chunks.append(self.model.encode_image(chunk))
        return torch.cat(chunks)

    @torch.inference_mode()
    def decode_windows(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Patch tokens (K, N, C) x text (P, 1, E) -> densities (P, K, 1, S, S), all pairs batched.

        What no prompt changes (`shared_features`) is computed once per window, not once per pair.
        """
        windows, prompts = features.shape[0], text.shape[0]
        pairs = [(p, k) for p in range(prompts) for k in range(windows)]
        outputs = []
        with self._precision():
            shared = torch.cat([self.model.shared_features(features[first : first + self.max_batch])
                                for first in range(0, windows, self.max_batch)])  # (K, N, C)
            for first in range(0, len(pairs), self.max_batch):
                chunk = pairs[first : first + self.max_batch]
                feats = shared[[k for _, k in chunk]]
                texts = text[[p for p, _ in chunk]]
                outputs.append(self.model.density_from_shared(feats, texts, (self.window, self.window)).float())
        return torch.cat(outputs).view(prompts, windows, 1, self.window, self.window)

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Image (3, H, W) in [0, 1] -> one density (H', W') per prompt, on the CPU, float32.

        The image is resized to the model's image height first (H', the window size unless the
        model's config says otherwise); count = density.sum() / density_scale.
        """
        return self.predict_many([image], prompts)[0]

    @torch.inference_mode()
    def predict_many(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> list[list[torch.Tensor]]:
        """Images [(3, H, W)] -> for each image, one density (H', W') per prompt (as `predict`).

        The windows of all images share forward passes of up to `max_batch` windows: on a GPU a
        few small images alone would leave most of it idle.
        """
        text = self.encode_prompts(prompts)
        plans, windows = [], []
        for image in images:
            resized, _, _ = resize_to_height(image.float(), self.image_height)
            plans.append(plan_windows(*resized.shape[-2:], self.window, self.stride, self.windowing))
            windows.append(split_windows(resized, plans[-1]))  # (K_i, 3, S, S)
        densities = self.decode_windows(self.encode_windows(torch.cat(windows)), text)  # (P, sum K_i, 1, S, S)
        results, first = [], 0
        for plan in plans:
            own = densities[:, first : first + plan.num_windows]
            results.append([merge_windows(d, plan)[0].cpu() for d in own])
            first += plan.num_windows
        return results

    def count(self, density: torch.Tensor) -> float:
        """A merged density map (..., H, W) -> its count, by the model's own rule (ClipCount.count:
        sum / density_scale, floored at 0)."""
        return float(self.model.count(density.reshape(1, 1, *density.shape[-2:]))[0])
