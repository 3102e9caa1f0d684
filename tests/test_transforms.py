from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from eclipse_transforms import (
    CorruptionCompensation,
    Despeckle,
    EclipsePurify,
    ForwardDiffusion,
    JPEGCompression,
    RepairBorder,
    ReverseDiffusion,
)

from ._checks import check_transform
from .conftest import H, W


@pytest.fixture()
def image() -> torch.Tensor:
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))


def test_eclipse_purify_contract(tiny, image):
    check_transform(
        EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=3, compensation=None, seed=0),
        image,
        deterministic=True,
        atol=2e-5,
    )


def test_eclipse_purify_with_compensation_contract(tiny, image):
    check_transform(EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, seed=0), image, deterministic=False)


def test_eclipse_purify_without_diffusion_contract(tiny, image):
    squeeze = v2.Compose([RepairBorder(), Despeckle(64 / 255), JPEGCompression(20)])
    check_transform(
        EclipsePurify(tiny, t_star=10, prefilter=squeeze, diffusion=False, compensation=None, seed=0),
        image,
        deterministic=True,
    )
    x = (image * 255).round().to(torch.uint8)
    assert torch.equal(
        EclipsePurify(tiny, t_star=10, prefilter=squeeze, diffusion=False, compensation=None)(x), squeeze(x)
    )


def test_the_default_recipe_is_the_squeeze(image):
    purify = EclipsePurify()
    assert purify.recipe == "squeeze" and not purify.diffusion
    assert (purify.compensation.p_gray, purify.compensation.sigma) == (0.4, 0.0)
    check_transform(EclipsePurify(compensation=None), image, deterministic=True)
    check_transform(purify, image, deterministic=False)
    x = (torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    squeeze = v2.Compose([RepairBorder(), Despeckle(64 / 255), JPEGCompression(20)])
    assert torch.equal(EclipsePurify(compensation=None)(x), squeeze(x))
    assert "recipe='squeeze'" in repr(purify) and "t_star" not in repr(purify)  # no diffusion, nothing of it said


def test_the_eclipse_recipe_is_the_papers_stages(tiny, image):
    paper = EclipsePurify(recipe="eclipse")
    assert paper.diffusion and paper.prefilter is None and paper.t_star == 100 and paper.steps == 4
    assert (paper.compensation.p_gray, paper.compensation.sigma) == (0.4, 0.05)
    # the settings override the recipe one by one: the squeeze, then the diffusion
    both = EclipsePurify(tiny, diffusion=True, t_star=10, steps=2, compensation=None, seed=0)
    x = image.unsqueeze(0)
    squeezed = EclipsePurify(compensation=None)(x)
    paper = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None)
    out = both.purify_batch(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, paper.purify_batch(squeezed, torch.Generator().manual_seed(3)))
    assert not torch.allclose(out, squeezed)  # the diffusion ran


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe": "jpeg"}, "recipe must be one of 'squeeze', 'eclipse', got 'jpeg'"),
        ({"recipe": None}, "recipe must be one of"),
        ({"t_star": 50}, "t_star sets the diffusion, which recipe='squeeze' does not run; pass recipe='eclipse'"),
        ({"steps": None}, "steps sets the diffusion"),  # None is a setting: the paper's sampler
        ({"revision": "main"}, "revision sets the diffusion"),
    ],
)
def test_diffusion_settings_without_the_diffusion_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EclipsePurify(**kwargs)


def test_a_denoiser_without_the_diffusion_is_refused_unless_said(tiny):
    with pytest.raises(ValueError, match="denoiser sets the diffusion"):
        EclipsePurify(tiny)
    assert not EclipsePurify(tiny, t_star=10, diffusion=False).diffusion  # said: the denoiser only goes along


def test_forward_diffusion_contract(tiny, image):
    check_transform(
        ForwardDiffusion(tiny, t_star=10, seed=1), image, deterministic=True, accepts_uint8=False, range_01=False
    )


def test_reverse_diffusion_contract(tiny, image):
    check_transform(
        ReverseDiffusion(tiny, t_star=10, steps=4, seed=2), image, deterministic=True, accepts_uint8=False, atol=2e-5
    )


def test_compensation_contract(image):
    check_transform(CorruptionCompensation(), image, deterministic=False)


def test_compensation_is_fresh_on_every_call(image):
    comp = CorruptionCompensation()
    assert not torch.equal(comp(image), comp(image))
    torch.manual_seed(3)
    a = comp(image)
    torch.manual_seed(3)
    assert torch.equal(a, comp(image))


def test_compensation_draws_grayscale_per_image():
    torch.manual_seed(0)
    x = torch.zeros(200, 3, 5, 7)
    x[:, 0] = 1.0
    out = CorruptionCompensation(p_gray=0.5, sigma=0.0)(x)
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1)
    assert 60 < gray.sum() < 140  # per image, not one decision for the whole batch


def test_stages_compose_into_a_purifier(tiny, image):
    noisy = ForwardDiffusion(tiny, t_star=10, seed=0)(image)
    assert noisy.min() < 0 or noisy.max() > 1 or not torch.equal(noisy, image)
    out = ReverseDiffusion(tiny, t_star=10, steps=2, seed=0)(noisy)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1


def test_purify_stage_properties_share_settings(tiny):
    p = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=3, seed=4)
    forward, reverse = p.forward_diffusion, p.reverse_diffusion
    assert forward.denoiser is tiny and forward.t_star == 10 and forward.seed == 4
    assert reverse.steps == 3 and reverse.t_star == 10
    with pytest.warns(FutureWarning, match="forward_diffusion"):
        assert p.noise.t_star == 10  # the old names still work, and say the new ones


def test_old_functional_names_warn_and_agree(tiny):
    import eclipse_transforms.functional as EF

    x = torch.rand(2, 3, 8, 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with pytest.warns(FutureWarning, match="use forward_diffusion"):
        old = EF.diffuse(x, tiny, 10, generator=g())
    assert torch.equal(old, EF.forward_diffusion(x, tiny, 10, generator=g()))
    with pytest.warns(FutureWarning, match="use corruption_compensation"):
        EF.compensate(x)
    with pytest.warns(FutureWarning, match="use reverse_diffusion"):
        EF.denoise(old, tiny, 10, steps=1, generator=g())


def test_seed_none_gives_fresh_output_and_seed_int_repeats(tiny, image):
    fresh = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None)
    assert not torch.equal(fresh(image), fresh(image))
    fixed = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None, seed=7)
    assert torch.equal(fixed(image), fixed(image))
    other = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None, seed=8)
    assert not torch.equal(fixed(image), other(image))


def test_repr_shows_settings(tiny):
    r = repr(EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=3, seed=0))
    assert "t_star=10" in r and "steps=3" in r and "seed=0" in r and "CorruptionCompensation" in r
    assert "p_gray=0.4" in repr(CorruptionCompensation())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny, image):
    cpu = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=3, compensation=None, seed=0)
    gpu = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=3, compensation=None, seed=0).to("cuda")
    out = gpu(image.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), cpu(image), atol=1e-4)


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(3, H, W) * 255, r"\[0, 1\].*divide by 255"),
        ((torch.rand(3, H, W) - 0.5) / 0.25, r"\[0, 1\].*normaliz"),
        # ImageNet statistics: values reach 2.6, which must not read as 0-255 data.
        ((torch.rand(3, H, W) - 0.406) / 0.225, r"\[0, 1\].*normalized images"),
        (torch.rand(H, W, 3), r"channels-last.*permute\(2, 0, 1\)"),
        (torch.full((3, H, W), float("nan")), "NaN or inf"),
        (torch.full((3, H, W), float("inf")), "NaN or inf"),
        (torch.rand(1, H, W), "must have 3 channels"),
        (torch.rand(4, H, W), "must have 3 channels"),
        (torch.rand(3, 11, 7), "multiples of 2"),
        (torch.rand(H, W), r"shape \(\.\.\., C, H, W\)"),
        (torch.randint(0, 9, (3, H, W), dtype=torch.int32), "uint8 or floating point"),
    ],
)
def test_purify_rejects_bad_images(tiny, x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2)(x)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_purify_rejects_non_rgb_pil(tiny, mode):
    img = PIL.Image.fromarray(np.zeros((H, W, 4 if mode == "RGBA" else 1), np.uint8).squeeze(), mode)
    with pytest.raises(ValueError, match="RGB PIL image.*convert"):
        EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2)(img)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"t_star": 0}, ValueError, r"t_star must be in \[1, 100\]"),
        ({"t_star": 500}, ValueError, r"t_star must be in \[1, 100\]"),
        ({"t_star": 41}, ValueError, "above t_max=40"),
        ({"t_star": 10.0}, TypeError, "t_star must be an int"),
        ({"t_star": 10, "steps": 0}, ValueError, r"steps must be in \[1, t_star=10\]"),
        ({"t_star": 10, "steps": 11}, ValueError, r"steps must be in \[1, t_star=10\]"),
        ({"t_star": 10, "seed": "x"}, TypeError, "seed must be an int"),
        ({"t_star": 10, "compensation": v2.RandomGrayscale()}, TypeError, "compensation must be"),
    ],
)
def test_purify_rejects_bad_arguments(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        EclipsePurify(tiny, recipe="eclipse", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_gray": 1.5}, "p_gray must be in"),
        ({"sigma": -0.1}, "sigma must"),
        ({"p_gray": "0.4"}, "p_gray must be a number"),
        ({"sigma": None}, "sigma must be a number"),
    ],
)
def test_compensation_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CorruptionCompensation(**kwargs)


def test_noise_stage_refuses_uint8(tiny):
    with pytest.raises(TypeError, match="float image tensor.*ToDtype"):
        ForwardDiffusion(tiny, t_star=10)(torch.zeros(3, H, W, dtype=torch.uint8))


# -- no image passes through unpurified ------------------------------------------------------------------------


def test_every_image_of_a_list_or_tuple_is_purified(tiny):
    purify = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None, seed=0)
    a, b = torch.rand(3, H, W), torch.rand(3, H, W)
    out = purify([a, b])
    assert torch.equal(out[0], purify(a)) and torch.equal(out[1], purify(b))
    pil = v2.functional.to_pil_image(a)
    image, label, boxes_like = purify((pil, torch.tensor(3), torch.tensor([1.0, 2.0])))
    assert isinstance(image, PIL.Image.Image) and image.tobytes() == purify(pil).tobytes()
    assert label.item() == 3 and boxes_like.tolist() == [1.0, 2.0]  # 0-d and 1-d tensors are not images
    mixed = purify({"image": tv_tensors.Image(a), "extra": b})
    assert torch.equal(mixed["extra"], purify(b))  # torchvision would pass the plain tensor through


@pytest.mark.parametrize("transform", ["purify", "compensation"])
def test_numpy_images_are_refused_not_passed_through(tiny, transform):
    tf = (
        EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2)
        if transform == "purify"
        else CorruptionCompensation()
    )
    with pytest.raises(TypeError, match="numpy array of shape.*v2.ToImage"):
        tf(np.zeros((H, W, 3), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        tf((torch.rand(3, H, W), np.zeros((H, W, 3), np.uint8)))
    assert tf((torch.rand(3, H, W), np.int64(2)))[1] == 2  # a numpy label is not an image


def test_numpy_integers_are_ints(tiny, image):
    a = EclipsePurify(
        tiny, recipe="eclipse", t_star=np.int64(10), steps=np.int32(2), compensation=None, seed=np.int64(4)
    )
    b = EclipsePurify(tiny, recipe="eclipse", t_star=10, steps=2, compensation=None, seed=4)
    assert type(a.seed) is int and torch.equal(a(image), b(image))
