from __future__ import annotations

import re

import pytest
import torch

from eclipse_transforms.bench.poisons import get_poison, list_poisons, lsp, ops, register_poison, urp


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(60) % 10
    return images, labels


def test_registry():
    assert list_poisons() == ["adp", "ar", "cuda", "em", "lsp", "ops", "rem", "sep", "tap", "urp"]
    assert get_poison("URP") is urp
    with pytest.raises(
        ValueError, match="unknown poison 'xyz'; available: adp, ar, cuda, em, lsp, ops, rem, sep, tap, urp"
    ):
        get_poison("xyz")
    with pytest.raises(ValueError, match="already registered"):
        register_poison("urp")(urp)


@pytest.mark.parametrize("name", ["urp", "lsp", "ar", "ops", "cuda"])
def test_shape_dtype_determinism_and_labels(data, name):
    images, labels = data
    if name == "ar":  # the rejection search grows with the number of classes; 3 keep the fast suite fast
        labels = labels % 3
    expected_labels = labels.clone()
    fn = get_poison(name)
    a, b = fn(images, labels, seed=1), fn(images, labels, seed=1)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)
    assert torch.equal(labels, expected_labels)  # labels are never touched
    if name not in ("ops",):
        assert not torch.equal(a, fn(images, labels, seed=2))


def test_urp_budget_and_class_wise_pattern(data):
    images, labels = data
    images = torch.full_like(images, 128)
    out = urp(images, labels, seed=0)
    delta = out.int() - images.int()
    assert delta.abs().max() <= 8 and delta.abs().max() >= 7  # L∞ 8/255 after rounding
    assert torch.equal(delta[0], delta[10]) and not torch.equal(delta[0], delta[1])  # one pattern per class


def test_lsp_budget_and_structure(data):
    images, labels = data
    images = torch.full_like(images, 128)  # no clipping, so the budget is visible
    out = lsp(images, labels, seed=0)
    delta = (out.float() - images.float()) / 255
    norms = delta.flatten(1).norm(dim=1)
    target = (6 / 255) * 3072**0.5  # 1.304
    # Each rounding error is repeated over a 64-pixel patch, so single images drift by a few percent.
    assert (norms - target).abs().max() < 0.06 and abs(norms.mean() - target) < 0.01, (norms.min(), norms.max())
    # Constant on each 8x8 patch (each of the 4x4x3 point's values upsampled to a patch), different across patches.
    patches = out.view(60, 3, 4, 8, 4, 8)
    assert (patches == patches[:, :, :, :1, :, :1]).all()
    assert not torch.equal(out[:, :, :8, :8], out[:, :, 8:16, 16:24])
    # Linearly separable by class: class means are far apart relative to the spread within a class.
    flat = delta.flatten(1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(10)])
    assert torch.cdist(means, means).fill_diagonal_(float("inf")).min() > 0.2


def test_ar_budget_and_class_filters():
    from eclipse_transforms.bench.poisons import _ar_coefficients, _ar_fill, _ar_response, ar

    images = torch.full((40, 3, 32, 32), 128, dtype=torch.uint8)
    labels = torch.arange(40) % 4
    delta = (ar(images, labels, seed=0).float() - 128) / 255
    norms = delta.flatten(1).norm(dim=1)
    assert (norms - 1.0).abs().max() < 0.02  # L2 = 1.0 per image, up to rounding
    assert not torch.equal(delta[0], delta[4])  # a fresh process per image, even within a class
    # Each class's AR filter annihilates its own processes and responds to every other class's.
    g = torch.Generator().manual_seed(0)
    coeffs = _ar_coefficients(4, g, 0.5, (20, 20))
    procs = [_ar_fill(cf, torch.randn(3, 3, 20, 20, generator=g))[:, :, 4:, 4:] for cf in coeffs]
    for i, cf in enumerate(coeffs):
        for j, x in enumerate(procs):
            response = _ar_response(cf, x)
            assert (response < 1e-4).all() if i == j else (response >= 0.5).all(), (i, j, response)


def test_ops_sets_one_pixel_per_class(data):
    images, labels = data
    out = ops(images, labels)
    changed = (out != images).any(1).flatten(1)  # (N, HW)
    assert changed.sum(1).max() == 1  # L0: one pixel (or none, if it already had that colour)
    pixels = {}
    for i in range(len(images)):
        where = changed[i].nonzero().flatten().tolist()
        if where:
            pixels.setdefault(int(labels[i]), set()).update(where)
    assert all(len(p) == 1 for p in pixels.values())
    values = out.flatten(2)
    for cls, (pixel,) in pixels.items():
        colours = values[labels == cls][:, :, pixel]
        assert ((colours == 0) | (colours == 255)).all() and (colours == colours[0]).all()


def test_cuda_normalises_each_image_to_its_maximum(data):
    images, labels = data
    out = get_poison("cuda")(images, labels, seed=0)
    assert (out.flatten(1).amax(1) == 255).all()


def test_bad_input():
    with pytest.raises(TypeError, match="uint8 tensor of shape"):
        urp(torch.rand(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ValueError, match="never truncated"):
        urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0.0, 2.7]))
    with pytest.raises(ValueError, match="non-negative"):
        urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, -1]))
    images, labels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1])
    settings = {
        "urp": ({"epsilon": 0.0}, "epsilon must be a number > 0; got 0.0"),
        "lsp": ({"patch": 0}, "patch must be an int >= 1 that divides the image size 8x8, got 0"),
        "ar": ({"l2": float("nan")}, "l2 must be a number > 0; got nan"),
        "cuda": ({"blur": -0.1}, "blur must be a number >= 0; got -0.1"),
    }
    for name, (kwargs, message) in settings.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            get_poison(name)(images, labels, **kwargs)
    whole = urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0.0, 1.0]), seed=0)
    assert torch.equal(whole, urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), seed=0))
