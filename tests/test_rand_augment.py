"""kat.data.gpu.rand_augment.BatchRandAugment against timm's own RandAugment ops on PIL images: every op of
both op sets (exact; geometric ops within one level), batching (= one image at a time), the draws of
sample(), the config parser and the argument checks."""

import math
import random

import numpy as np
import pytest
import torch
from devices import needs_interpreter
from PIL import Image
from timm.data.auto_augment import AugmentOp

from kat.data.gpu.rand_augment import (
    NEGATED,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    BatchRandAugment,
    Kind,
)
from kat.data.gpu.rand_augment.kernels import apply_kernels

FILL = (124, 116, 104)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
MAGNITUDES = (0.0, 2.5, 5.0, 7.25, 9.0, 10.0, 13.5, 25.0)  # exact in float32; > 10 as mmax allows
PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def make_images(h: int = 32, w: int = 40) -> torch.Tensor:
    """uint8 [5, 3, h, w]: noise, a noisy gradient, low contrast, two values, one value (the histogram ops'
    special cases)."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    noise = torch.randint(0, 256, (3, h, w), generator=g)
    gradient = torch.stack([xs * 6, ys * 7, (xs + ys) * 3]) + torch.randint(0, 20, (3, h, w), generator=g)
    low_contrast = 100 + torch.randint(0, 40, (3, h, w), generator=g)
    two_values = torch.full((3, h, w), 7)
    two_values[:, :5, :6] = 200
    one_value = torch.full((3, h, w), 90)
    return torch.stack([noise, gradient, low_contrast, two_values, one_value]).clamp(0, 255).to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def seed_sign(sign: float) -> None:
    """Seed `random` so that timm's next _randomly_negate (-v if random.random() > 0.5) keeps `sign`."""
    for seed in range(100):
        random.seed(seed)
        if (random.random() > 0.5) == (sign < 0):
            random.seed(seed)
            return


def timm_op(name: str, magnitude: float, sign: float, image: torch.Tensor, interpolation: str):
    """timm's AugmentOp (always applied, fixed magnitude, the given sign) on PIL; None where it raises."""
    hparams = dict(
        img_mean=FILL,
        interpolation=PIL_INTERPOLATION[interpolation],
        translate_pct=0.45,
        magnitude_max=30,
    )
    op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    seed_sign(sign)
    try:
        return from_pil(op(to_pil(image)))
    except ValueError:  # Pillow 13 rejects posterize to < 1 bit
        assert name.startswith("Posterize")
        return None


def op_cases(config: str, interpolations=("bicubic",)):
    ops = RAND_INCREASING_TRANSFORMS if "inc1" in config else RAND_TRANSFORMS
    for name in ops:
        for interpolation in interpolations if name in GEOMETRIC else ("bicubic",):
            yield pytest.param(config, name, interpolation, id=f"{config}-{name}-{interpolation}")


@pytest.mark.parametrize(
    "config,name,interpolation",
    [*op_cases("rand-m9-n1", ("bilinear", "bicubic")), *op_cases("rand-m9-n1-inc1")],
)
def test_each_op_matches_timm(config, name, interpolation):
    augment = BatchRandAugment(config, FILL, interpolation=interpolation)
    images = make_images()
    k = augment.ops.index(name)
    signs = (1.0, -1.0) if name in NEGATED else (1.0,)
    cases = [(i, m, s) for i in range(len(images)) for m in MAGNITUDES for s in signs]
    batch = images[[i for i, _, _ in cases]]
    params = torch.tensor([[[k, m, s]] for _, m, s in cases], dtype=torch.float32)
    out = augment(batch, params)
    diffs = []
    for j, (i, m, s) in enumerate(cases):
        expected = timm_op(name, m, s, images[i], interpolation)
        if expected is None:  # 0 bits: black (timm's intent; Pillow 13 raises)
            assert (out[j] == 0).all(), (m, s)
            continue
        diffs.append((out[j].int() - expected.int()).abs())
    diff = torch.stack(diffs).float()
    if name in GEOMETRIC:
        # PIL interpolates in float64 and truncates; we weight in float32 (see the module docstring).
        assert diff.max() <= 1, f"{name}: max abs diff {diff.max()}"
        assert diff.mean() < 0.02, f"{name}: mean abs diff {diff.mean():.4f}"
    else:
        assert diff.max() == 0, f"{name}: max abs diff {diff.max()}, mean {diff.mean():.4f}"


def test_posterize_to_zero_bits_is_black():
    augment = BatchRandAugment("rand-m9-n1", FILL)
    images = make_images()[:2]
    params = torch.tensor([[[augment.ops.index("Posterize"), 2.0, 1.0]]] * 2)  # int(0.2 * 4) = 0 bits
    assert (augment(images, params) == 0).all()


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-n3-p0.7", "rand-m8-mstd1-inc1-n3-p0.8"])
def test_mixed_batch_equals_one_image_at_a_time_and_timm(config):
    augment = BatchRandAugment(config, FILL, interpolation="bilinear")
    images = torch.randint(
        0, 256, (24, 3, 32, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    images[::3] = make_images().repeat(3, 1, 1, 1)[:8]  # some images with the histogram ops' special cases
    random.seed(0)
    params = torch.stack([augment.sample() for _ in images])
    assert (params[..., 0] == -1).any() and len(params[..., 0].unique()) > 8
    out = augment(images, params)
    for i in range(len(images)):
        assert torch.equal(out[i : i + 1], augment(images[i : i + 1], params[i : i + 1]))
    # timm, one op after another; a level of difference after a geometric op can grow in a later
    # histogram op, so this compares the fraction of equal pixels.
    same = 0
    for image, draws, result in zip(images, params, out):
        for op, magnitude, sign in draws.tolist():
            if op >= 0:
                image = timm_op(augment.ops[int(op)], magnitude, sign, image, "bilinear")
        same += (image == result).float().mean() / len(images)
    assert same > 0.98


def test_output_dtype_shape_device_and_input_untouched():
    augment = BatchRandAugment("rand-m9-mstd0.5", FILL)
    images = make_images()
    before = images.clone()
    random.seed(0)
    params = torch.stack([augment.sample() for _ in images]).double()  # any float dtype
    out = augment(images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    assert torch.equal(images, before)
    skipped = torch.full((len(images), 2, 3), -1.0)
    assert torch.equal(augment(images, skipped), images)


def kernel_layers(augment: BatchRandAugment, images: torch.Tensor, params: torch.Tensor):
    return [augment.arguments(params.double()[:, layer], *images.shape[2:]) for layer in range(params.shape[1])]


def assert_kernels_match(out: torch.Tensor, expected: torch.Tensor, geometric: bool) -> None:
    diff = (out.int() - expected.int()).abs()
    if geometric:  # the same float64 points and float32 weights; only the order of the float32 sums can differ
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
    else:
        assert diff.max() == 0, f"max abs diff {diff.max()} at {(diff > 0).nonzero()[:5].tolist()}"


@needs_interpreter
@pytest.mark.parametrize(
    "config,name,interpolation",
    [
        *op_cases("rand-m9-n1", ("bilinear", "bicubic")),
        *(case for case in op_cases("rand-m9-n1-inc1") if case.values[1] not in GEOMETRIC),  # the same ops
    ],
)
def test_kernels_are_the_tensor_ops(config, name, interpolation):
    """CUDA's path, each op through the layer kernel (here in the interpreter), against the tensor ops that
    test_each_op_matches_timm checks against timm; images of odd sizes (a partial last block of pixels), large
    enough for Equalize's steps to matter. Geometric ops on fewer, smaller cases: the interpreter runs their 16
    taps slowly."""
    augment = BatchRandAugment(config, FILL, interpolation=interpolation)
    images = make_images(13, 21)[:3] if name in GEOMETRIC else make_images(37, 53)
    k = augment.ops.index(name)
    signs = (1.0, -1.0) if name in NEGATED else (1.0,)
    magnitudes = (9.0, 25.0) if name in GEOMETRIC else (0.0, 5.0, 9.0, 25.0)
    cases = [(i, m, s) for i in range(len(images)) for m in magnitudes for s in signs]
    batch = images[[i for i, _, _ in cases]]
    params = torch.tensor([[[k, m, s]] for _, m, s in cases], dtype=torch.float32)
    out = apply_kernels(batch, kernel_layers(augment, batch, params), FILL, interpolation)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert_kernels_match(out, augment(batch, params), name in GEOMETRIC)


@needs_interpreter
def test_kernels_mixed_layers_and_skips():
    """Three layers in which the images drew different ops (or none): the kernels apply each image's own op,
    leave skipped images as they were, and do not touch their input."""
    augment = BatchRandAugment("rand-m8-mstd1-n3-p0.7", FILL, interpolation="bilinear")
    images = torch.randint(0, 256, (12, 3, 9, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    images[::4] = make_images(9, 11)[2:5]  # low contrast, two values, one value
    random.seed(3)
    params = torch.stack([augment.sample() for _ in images])
    layers = kernel_layers(augment, images, params)
    assert len({int(k) for layer in layers for k in layer.kind}) >= 6
    before = images.clone()
    out = apply_kernels(images, layers, FILL, "bilinear")
    assert torch.equal(images, before)
    expected = augment(images, params)
    geometric = torch.stack([layer.kind == Kind.AFFINE for layer in layers]).any(0)
    assert_kernels_match(out[~geometric], expected[~geometric], geometric=False)
    assert_kernels_match(out[geometric], expected[geometric], geometric=True)
    skipped = torch.full((len(images), 3, 3), -1.0)
    identity = apply_kernels(images, kernel_layers(augment, images, skipped), FILL, "bilinear")
    assert torch.equal(identity, images) and identity.data_ptr() != images.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """The compiled kernels (CUDA's path) against the tensor ops on the CPU, every op of both op sets: equal,
    except a level where a geometric op's float32 sums round differently. With two layers, such a level can
    grow in a later histogram op, so there only the images without a geometric op are compared."""
    for config in ("rand-m9-mstd0.5-n1-p1", "rand-m9-mstd0.5-n1-p1-inc1", "rand-m9-mstd0.5-n2-p0.8"):
        augment = BatchRandAugment(config, FILL)
        images = make_images().repeat(40, 1, 1, 1)
        random.seed(0)
        params = torch.stack([augment.sample() for _ in images])
        assert len(params[..., 0].unique()) >= len(augment.ops)
        expected = augment(images, params)
        geometric = torch.isin(params[..., 0], torch.tensor([augment.ops.index(g) for g in GEOMETRIC])).any(1)
        for p in (params, params.cuda()):
            out = augment(images.cuda(), p)
            assert out.device.type == "cuda" and out.dtype == torch.uint8
            out = out.cpu()
            assert_kernels_match(out[~geometric], expected[~geometric], geometric=False)
            if augment.num_layers == 1:
                assert (out[geometric].int() - expected[geometric].int()).abs().max() <= 1, config


def test_sample_draws():
    augment = BatchRandAugment("rand-m9-mstd0.5", FILL)
    random.seed(0)
    draws = torch.stack([augment.sample() for _ in range(10000)]).view(-1, 3)
    assert augment.sample().dtype == torch.float32 and augment.sample().shape == (2, 3)
    op, magnitude, sign = draws.unbind(1)
    skipped = op == -1
    assert abs(skipped.float().mean() - 0.5) < 0.02
    assert (magnitude[skipped] == 0).all() and (sign[skipped] == 1).all()
    counts = torch.bincount(op[~skipped].long(), minlength=15)
    assert len(counts) == 15 and (counts - counts.float().mean()).abs().max() < 0.15 * counts.float().mean()
    m = magnitude[~skipped]
    assert m.min() >= 0 and m.max() <= 10 and abs(m.mean() - 9) < 0.03 and abs(m.std() - 0.5) < 0.05
    negated = torch.tensor([augment.ops[int(k)] in NEGATED for k in op[~skipped]])
    s = sign[~skipped]
    assert (s[~negated] == 1).all() and abs((s[negated] == -1).float().mean() - 0.5) < 0.03
    random.seed(0)
    assert torch.equal(augment.sample(), draws[:2])  # reproducible under a seeded `random`


@pytest.mark.parametrize(
    "config,low,high,mean",
    [
        ("rand-m7-p1", 7, 7, 7),  # no noise, never skipped
        ("rand-m15-mstd0-p1", 10, 10, 10),  # clipped to mmax = 10
        ("rand-m15-mmax20-p1", 15, 15, 15),
        ("rand-m9-mstd101-p1", 0, 9, 4.5),  # uniform in [0, m]
        ("rand-m9-mstdinf-p1", 0, 9, 4.5),
    ],
)
def test_sample_magnitudes(config, low, high, mean):
    augment = BatchRandAugment(config, FILL)
    random.seed(1)
    m = torch.stack([augment.sample() for _ in range(3000)])[..., 1]
    assert (m >= low).all() and (m <= high).all() and abs(m.mean() - mean) < 0.2


def test_config_accepted():
    a = BatchRandAugment("rand-m9-mstd0.5", FILL)
    assert (a.magnitude, a.num_layers, a.magnitude_std, a.magnitude_max, a.prob) == (9, 2, 0.5, 10, 0.5)
    assert a.ops == RAND_TRANSFORMS and a.interpolation == "bicubic"
    b = BatchRandAugment("rand-m7-n3-mstd101-mmax20-inc1-p0.8", FILL, interpolation="bilinear")
    assert (b.magnitude, b.num_layers, b.magnitude_std, b.magnitude_max, b.prob) == (7, 3, math.inf, 20, 0.8)
    assert b.ops == RAND_INCREASING_TRANSFORMS and b.sample().shape == (3, 3)
    assert BatchRandAugment("rand", FILL).magnitude == 10


@pytest.mark.parametrize(
    "config,message",
    [
        ("rand-m9-w0", r"unsupported key 'w' \(section 'w0'\); supported keys: mstd<float>.*p<float>"),
        ("rand-m9-tweights", r"unsupported key 't' \(section 'tweights'\).*transform sets"),
        ("augmix-m5", r"'augmix-m5' must start with 'rand'"),
        ("rand-m", r"section 'm' has no valid value; expected m<int> magnitude"),
        ("rand-m9.5", r"section 'm9.5' has no valid value"),
        ("rand-m9-m8", r"key 'm' appears twice"),
        ("rand-inc2", r"section 'inc2'; expected inc<0\|1>"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        BatchRandAugment(config, FILL)


def test_argument_errors():
    with pytest.raises(ValueError, match="interpolation='random'.*'bilinear' and 'bicubic'"):
        BatchRandAugment("rand-m9", FILL, interpolation="random")
    with pytest.raises(ValueError, match=r"img_mean=\(1, 2\)"):
        BatchRandAugment("rand-m9", (1, 2))
    augment = BatchRandAugment("rand-m9", FILL)
    images = make_images()
    params = torch.full((len(images), 2, 3), -1.0)
    with pytest.raises(TypeError, match="expects uint8 images .* got torch.float32"):
        augment(images.float(), params)
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 40\)"):
        augment(images[0], params)
    with pytest.raises(ValueError, match=r"got shape \(5, 1, 32, 40\)"):
        augment(images[:, :1], params)
    with pytest.raises(
        ValueError, match=r"params \(5, 1, 3\) for 5 images: expected a tensor of shape \(5, 2, 3\)"
    ):
        augment(images, params[:, :1])
    with pytest.raises(ValueError, match=r"op indices in \[-1, 14\]"):
        augment(images, params.index_fill(1, torch.tensor([0]), 15.0))
