"""Every fast inference path gives the plain float32 path's answer.

The plain path is the model called on one window and one prompt at a time (`model(window, [prompt])`
through `windows.count_image`); the fast path is `DensityPredictor`: windows batched (and windows of
several images batched together), the image encoded once for all prompts, text embeddings cached.
Inside the model: the decoder's final 1x1 convolution before its last resize, channels-last maps,
cross-attention to one text token as its value, QuickGELU as one SiLU; and building on the meta
device (checkpoint loading) without importing torch's compiler.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipcount.config import tiny_config
from clipcount.engine.head_init import init_density_head
from clipcount.engine.inference import CPU_MAX_BATCH, DensityPredictor
from clipcount.engine.windows import count_image
from clipcount.modeling.clip_count import ClipCount
from clipcount.modeling.decoder import _ACTIVATIONS

PROMPTS = ["apples", "red cars", "people", "green triangles"]
WINDOW = 64  # the tiny model's window
STRIDE = WINDOW // 3


def make_model(compat: bool = False, text_similarity: bool = False) -> ClipCount:
    """A random tiny model; the default (linear) head starts at a small positive density, as training
    starts it, so that counts are well away from 0 and relative tolerances mean something."""
    torch.manual_seed(0)
    config = tiny_config(compat)
    config.text_similarity = text_similarity
    model = ClipCount(config)
    if not compat:
        init_density_head(model, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> ClipCount:
    return make_model()


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))  # (3, H, W)


def plain_density(model: ClipCount, img: torch.Tensor, prompt: str, stride: int = STRIDE) -> torch.Tensor:
    """(window, W'): one window and one prompt per forward pass, float32, no caching."""
    density, _ = count_image(img, lambda w: model(w, [prompt] * w.shape[0]), WINDOW, stride, max_batch=1)
    return density[0]


def assert_same_counts(fast: list[torch.Tensor], plain: list[torch.Tensor]) -> None:
    for ours, theirs in zip(fast, plain):
        assert ours.shape == theirs.shape
        count, reference = float(ours.sum()), float(theirs.sum())
        assert abs(count - reference) <= 0.005 * abs(reference), (count, reference)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.parametrize(("compat", "similarity"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("size", [(64, 40), (64, 64), (80, 150), (50, 160)])
def test_predictor_counts_equal_the_plain_path(size, compat, similarity):
    model = make_model(compat, similarity)
    img = image(*size, seed=size[1])
    # max_batch 4: windows and (prompt, window) pairs are split over several forward passes
    predictor = DensityPredictor(model, stride=STRIDE, max_batch=4, device="cpu", precision="fp32")
    fast = predictor.predict(img, PROMPTS[:3])
    assert_same_counts(fast, [plain_density(model, img, prompt) for prompt in PROMPTS[:3]])


@pytest.mark.parametrize("size", [(64, 40), (80, 150), (200, 90)])
def test_a_model_taller_than_its_window_counts_rows_of_windows_like_the_plain_path(size):
    model = make_model()
    model.config.image_height = 100  # images resized to 100 pixels, cut into 64-pixel windows in rows
    img = image(*size, seed=size[0])
    predictor = DensityPredictor(model, stride=STRIDE, max_batch=4, device="cpu", precision="fp32")
    fast = predictor.predict(img, PROMPTS[:2])
    plain = [count_image(img, lambda w: model(w, [prompt] * w.shape[0]), WINDOW, STRIDE, max_batch=1,
                         height=100)[0][0] for prompt in PROMPTS[:2]]
    assert fast[0].shape == (100, round(size[1] * 100 / size[0]))
    assert_same_counts(fast, plain)


def test_windows_of_many_images_share_forward_passes(model):
    images = [image(64, 64, 1), image(100, 300, 2), image(64, 30, 3)]
    predictor = DensityPredictor(model, stride=STRIDE, max_batch=5, device="cpu", precision="fp32")
    together = predictor.predict_many(images, PROMPTS[:2])
    assert len(together) == 3 and all(len(per_image) == 2 for per_image in together)
    for img, densities in zip(images, together):
        assert_same_counts(densities, [plain_density(model, img, prompt) for prompt in PROMPTS[:2]])


def test_the_image_is_encoded_once_for_all_prompts(model, monkeypatch):
    predictor = DensityPredictor(model, stride=STRIDE, max_batch=64, device="cpu", precision="fp32")
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda windows: calls.append(windows.shape[0]) or encode(windows))
    predictor.predict(image(64, 160), PROMPTS)
    # the six windows of a 64x160 image, each encoded once for all four prompts, in passes of at
    # most CPU_MAX_BATCH windows (on a GPU: one pass)
    assert sum(calls) == 6 and len(calls) == math.ceil(6 / CPU_MAX_BATCH)


def test_text_embeddings_are_cached(model, monkeypatch):
    predictor = DensityPredictor(model, device="cpu", precision="fp32", text_cache_size=2)
    encoded = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda prompts: encoded.append(list(prompts)) or encode(prompts))
    first = predictor.encode_prompts(["apples", "cars", "apples"])
    second = predictor.encode_prompts(["cars", "apples"])
    assert encoded == [["apples", "cars"]]  # duplicates once, repeats never
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], first[2])
    predictor.encode_prompts(["people"])  # a third prompt evicts the least recently used ("cars")
    predictor.encode_prompts(["apples", "cars"])
    assert encoded[1:] == [["people"], ["cars"]]
    with torch.no_grad():
        assert torch.allclose(second, encode(["cars", "apples"]), atol=1e-6)


@pytest.mark.parametrize("width", [40, 64, 150, 250])
def test_strides_give_the_same_shapes(model, width):
    """stride == window (no overlap, fewest windows) and the default stride: same output grid."""
    img = image(64, width, seed=width)
    densities = {}
    for stride in (STRIDE, WINDOW):
        predictor = DensityPredictor(model, stride=stride, max_batch=8, device="cpu", precision="fp32")
        densities[stride] = predictor.predict(img, PROMPTS[:2])
        assert_same_counts(densities[stride], [plain_density(model, img, p, stride) for p in PROMPTS[:2]])
    for overlapped, tiled in zip(densities[STRIDE], densities[WINDOW]):
        assert overlapped.shape == tiled.shape == (WINDOW, width)
        assert torch.isfinite(tiled).all()
    if width <= WINDOW:  # one window either way: identical
        assert torch.equal(densities[STRIDE][0], densities[WINDOW][0])


def test_decoder_resizes_after_its_final_convolution_exactly(model):
    """conv1x1 then resize == resize then conv1x1 (bilinear weights sum to 1): the old order, by hand."""
    decoder = model.decoder
    torch.manual_seed(1)
    maps = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 16, 16)]
    with torch.no_grad():
        x = maps[0]
        for stage, conv in enumerate(decoder.convs):
            if 1 <= stage < len(maps):
                x = x + decoder.laterals[stage - 1](maps[stage])
            x = conv(x)
            if stage < len(decoder.convs) - 1:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(64, 96), mode="bilinear", align_corners=False)
        old = _ACTIVATIONS[decoder.activation](decoder.final_conv(x))
        new = decoder(maps, (64, 96))
    assert torch.allclose(new, old, rtol=1e-5, atol=1e-6)


def test_bf16_predictor_stays_close_to_float32(model):
    img = image(64, 150, seed=7)
    fp32 = DensityPredictor(model, stride=STRIDE, device="cpu", precision="fp32").predict(img, PROMPTS[:2])
    bf16 = DensityPredictor(model, stride=STRIDE, device="cpu", precision="bf16").predict(img, PROMPTS[:2])
    for ours, reference in zip(bf16, fp32):
        assert ours.dtype == torch.float32
        assert abs(float(ours.sum()) - float(reference.sum())) <= 0.03 * float(reference.sum())


def test_cross_attention_to_one_token_is_its_value_with_the_same_gradients():
    """The shortcut for a single text token (inference and training) equals full attention, in the
    output and in the gradients of the input, the text and every weight that gets one."""
    from clipcount.modeling.interaction import CrossAttention

    torch.manual_seed(0)
    attention = CrossAttention(16, heads=2)  # dropout 0
    x, text = torch.randn(3, 10, 16, requires_grad=True), torch.randn(3, 1, 16, requires_grad=True)
    for mode in (attention.train, attention.eval):
        mode()
        weight = torch.randn(3, 10, 16)
        shortcut = attention(x, text)
        full = attention.full_attention(x, text)
        assert shortcut.shape == full.shape == (3, 10, 16)
        assert torch.allclose(shortcut, full, atol=1e-6)
        wanted = [x, text, attention.wv.weight, attention.proj.weight]
        ours = torch.autograd.grad((shortcut * weight).sum(), wanted, allow_unused=True)
        reference = torch.autograd.grad((full * weight).sum(), wanted, retain_graph=True)
        for a, b, leaf in zip(ours, reference, wanted):  # the queries (x) do not change the output
            assert torch.allclose(torch.zeros_like(leaf) if a is None else a, b, atol=1e-5)
        (query_grad,) = torch.autograd.grad((full * weight).sum(), [attention.wq.weight])
        # what the shortcut leaves out only ever gets zero gradients (up to rounding)
        assert torch.allclose(query_grad, torch.zeros_like(query_grad), atol=1e-5)


def test_cross_attention_with_dropout_trains_on_full_attention():
    """Attention dropout could drop the one key's weight, so training with it takes the full path."""
    from clipcount.modeling.interaction import CrossAttention

    attention = CrossAttention(16, heads=2, dropout=0.5).train()
    out = attention(torch.randn(2, 6, 16), torch.randn(2, 1, 16))
    (query_grad,) = torch.autograd.grad(out.sum(), [attention.wq.weight], allow_unused=True)
    assert query_grad is not None  # the queries were computed


def test_quick_gelu_mlp_folds_its_scale_into_the_matmuls():
    from clipcount.modeling.clip import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 64, "quick_gelu")
    x = torch.randn(2, 5, 16, requires_grad=True)
    fused = mlp(x)  # (B, L, C)
    plain = mlp.c_proj(mlp.gelu(mlp.c_fc(x)))
    assert torch.allclose(fused, plain, atol=1e-6)
    (grad_fused,) = torch.autograd.grad(fused.sum(), x)
    (grad_plain,) = torch.autograd.grad(plain.sum(), x)
    assert torch.allclose(grad_fused, grad_plain, atol=1e-6)


def test_building_on_the_meta_device_imports_no_compiler():
    """Loading a checkpoint builds the model on the meta device; random ops there would import
    torch._dynamo and sympy (seconds of cold start)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from clipcount.config import ClipCountConfig\n"
        "from clipcount.modeling.clip_count import ClipCount\n"
        "with torch.device('meta'):\n"
        "    ClipCount(ClipCountConfig())\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]  # the repository: clipcount importable without installing
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_auto_precision_rule(monkeypatch, tmp_path):
    """auto: on a CPU with native bf16 (flags in /proc/cpuinfo) no autocast but the matmuls of
    auto_bf16_modules in bf16; float32 throughout on other CPUs; bf16 autocast on a GPU."""
    from clipcount.engine import inference

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert inference.cpu_has_native_bf16.__wrapped__(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not inference.cpu_has_native_bf16.__wrapped__(str(info))
    assert not inference.cpu_has_native_bf16.__wrapped__(str(tmp_path / "missing"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda native=native: native)
        assert inference.pick_dtype(cpu, "auto") is None
        assert inference.pick_bf16_modules(cpu, "auto", 12) == (inference.auto_bf16_modules(12) if native else None)
        assert inference.pick_bf16_modules(cpu, "fp32") is inference.pick_bf16_modules(cpu, "bf16") is None
        assert inference.pick_dtype(cpu, "fp32") is None and inference.pick_dtype(cpu, "bf16") == torch.bfloat16
    assert inference.pick_dtype(cuda, "auto") == torch.bfloat16 and inference.pick_bf16_modules(cuda, "auto") is None
    with pytest.raises(ValueError, match="unknown precision"):
        inference.pick_bf16_modules(cpu, "fp8")


def test_bf16_weight_copies_give_autocast_counts(model):
    """Weights cast once (CastWeights) give autocast's counts (within bf16 rounding: a few products
    such as bias x scale round in bf16 instead of float32), and the model gets its own float32
    parameters back after each call."""
    img = image(64, 150, seed=3)
    originals = {name: p for name, p in model.named_parameters()}
    cached = DensityPredictor(model, stride=STRIDE, device="cpu", precision="bf16")
    assert cached._weights is not None and cached._weights.slots
    plain = DensityPredictor(model, stride=STRIDE, device="cpu", precision="bf16")
    plain._weights = None
    for ours, reference in zip(cached.predict(img, PROMPTS[:2]), plain.predict(img, PROMPTS[:2])):
        assert abs(float(ours.sum()) - float(reference.sum())) <= 0.005 * abs(float(reference.sum()))
    assert all(p is originals[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_auto_attention_projections_skip_the_first_and_last_layers():
    import re

    from clipcount.engine.inference import AUTO_ATTENTION_SKIP, auto_bf16_modules

    def attention_layers(layers: int) -> list[int]:
        pattern = auto_bf16_modules(layers)
        return [i for i in range(layers) if re.fullmatch(pattern, f"clip.visual.transformer.resblocks.{i}.attn")]

    assert AUTO_ATTENTION_SKIP == 2
    assert attention_layers(12) == list(range(2, 10)) and attention_layers(4) == []
    for layers in (4, 12):  # every MLP, whatever the depth
        assert re.fullmatch(auto_bf16_modules(layers), f"clip.visual.transformer.resblocks.{layers - 1}.mlp")
    assert not re.fullmatch(auto_bf16_modules(12), "clip.transformer.resblocks.5.attn")  # the text tower


def auto_predictor(model, monkeypatch, **kwargs) -> DensityPredictor:
    from clipcount.engine import inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    return DensityPredictor(model, stride=STRIDE, device="cpu", precision="auto", **kwargs)


@pytest.mark.parametrize("compat", [False, True])
def test_auto_on_a_bf16_cpu_gives_the_plain_float32_counts(compat, monkeypatch):
    """The fast path `auto` takes on a CPU with native bf16 (bf16 matmuls in the image tower's MLPs and
    the interaction's self-attention and MLPs) gives the plain float32 path's counts within the
    stated tolerance (0.5% of the count, benchmarks/precision.py), and leaves the model float32."""
    model = make_model(compat)
    originals = {name: p for name, p in model.named_parameters()}
    predictor = auto_predictor(model, monkeypatch)
    assert predictor.autocast_dtype is None and predictor.bf16_modules
    img = image(80, 150, seed=5)
    fast = predictor.predict(img, PROMPTS[:3])
    for ours, prompt in zip(fast, PROMPTS[:3]):
        count, reference = float(ours.sum()), float(plain_density(model, img, prompt).sum())
        assert ours.dtype == torch.float32
        assert abs(count - reference) <= 0.005 * abs(reference), (count, reference)
    assert all(p is originals[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_auto_casts_only_its_modules(monkeypatch):
    """Which weights auto swaps for bf16 copies: the image tower's MLPs, the interaction's
    self-attention and MLPs; not the text tower, the image tower's attention, the cross-attention
    to the prompt or the decoder. An empty pattern casts nothing: float32 counts exactly."""
    from clipcount.engine.inference import AUTO_ATTENTION_SKIP
    from clipcount.modeling.clip import MultiheadSelfAttention
    from clipcount.modeling.interaction import FeedForward, SelfAttention

    model = make_model()
    blocks = model.clip.visual.transformer.resblocks
    blocks.extend(copy.deepcopy(blocks[-1]) for _ in range(2))  # 5 blocks: one in the middle
    layers = len(model.clip.visual.resblocks)
    predictor = auto_predictor(model, monkeypatch)
    swapped = {id(m) for m, _, _, _ in predictor._weights.slots}
    wanted, middle = set(), range(AUTO_ATTENTION_SKIP, layers - AUTO_ATTENTION_SKIP)
    for index, block in enumerate(model.clip.visual.resblocks):
        wanted |= {id(block.mlp.c_fc), id(block.mlp.c_proj)}
        wanted |= {id(block.attn), id(block.attn.out_proj)} if index in middle else set()
    for path, module in model.named_modules():
        if path.startswith("interaction.") and isinstance(module, (SelfAttention, FeedForward)):
            wanted |= {id(m) for m in module.modules() if isinstance(m, torch.nn.Linear)}
    assert layers == 5 and len(middle) == 1 and swapped == wanted
    assert len({id(m) for m, _, _, _ in predictor._weights.slots if isinstance(m, MultiheadSelfAttention)}) == 1
    img = image(64, 100, seed=2)
    nothing = auto_predictor(model, monkeypatch, bf16_modules="")
    assert nothing._weights is None
    fp32 = DensityPredictor(model, stride=STRIDE, device="cpu", precision="fp32")
    for ours, reference in zip(nothing.predict(img, PROMPTS[:2]), fp32.predict(img, PROMPTS[:2])):
        assert torch.equal(ours, reference)
    with pytest.raises(ValueError, match="decoder"):
        auto_predictor(model, monkeypatch, bf16_modules=r"decoder\.convs\.0")


def test_modules_compute_in_their_weights_dtype():
    """With bf16 weights and float32 inputs (no autocast) CLIP's attention and MLP compute in bf16 and
    answer in float32, close to the float32 answer; with float32 weights nothing changes."""
    from clipcount.engine.inference import CastWeights, within
    from clipcount.modeling.clip import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, heads=2, mlp_ratio=4.0, activation="quick_gelu", eps=1e-5).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = block(x)
        with CastWeights(block, torch.bfloat16, within("attn|mlp")).swapped():
            assert block.mlp.c_fc.weight.dtype == block.attn.in_proj_weight.dtype == torch.bfloat16
            low = block(x)
            assert block.mlp(x).dtype == block.attn(x).dtype == torch.float32
    assert low.dtype == torch.float32 and not torch.equal(low, reference)
    assert torch.allclose(low, reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))
    assert block.mlp.c_fc.weight.dtype == torch.float32


def test_channels_last_convolution_weights_change_nothing():
    """The predictor stores the interaction's and decoder's convolution weights channels-last (as
    their inputs are): the plain path gives the same densities before and after."""
    model = make_model()
    img = image(64, 64, seed=4)
    before = plain_density(model, img, PROMPTS[0])
    DensityPredictor(model, stride=STRIDE, device="cpu", precision="fp32")
    convs = [m for p, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and p.startswith("decoder.")]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert torch.allclose(plain_density(model, img, PROMPTS[0]), before, rtol=1e-5, atol=1e-6)


def test_density_head_runs_float32_under_autocast(model):
    maps = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 16, 16)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        density = model.decoder(maps, (64, 64))
    assert density.dtype == torch.float32
