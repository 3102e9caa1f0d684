from __future__ import annotations

import time

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
    assert list_poisons() == ["cuda", "lsp", "ops", "urp"]
    assert get_poison("URP") is urp
    with pytest.raises(ValueError, match="unknown poison 'em'; available: cuda, lsp, ops, urp"):
        get_poison("em")
    with pytest.raises(ValueError, match="already registered"):
        register_poison("urp")(urp)


@pytest.mark.parametrize("name", ["urp", "lsp", "ops", "cuda"])
def test_shape_dtype_determinism_and_labels(data, name):
    images, labels = data
    fn = get_poison(name)
    a, b = fn(images, labels, seed=1), fn(images, labels, seed=1)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)
    assert torch.equal(labels, torch.arange(60) % 10)  # labels are never touched
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
    # Each rounding error is repeated 64 times (2x2 blocks, 16 tiles), so single images drift by a few percent.
    assert (norms - target).abs().max() < 0.06 and abs(norms.mean() - target) < 0.01, (norms.min(), norms.max())
    # Constant on 2x2 blocks (4x4 points upsampled to 8x8) and repeated every 8 pixels.
    assert torch.equal(out[:, :, 0::2, 0::2], out[:, :, 1::2, 1::2])
    assert torch.equal(out[:, :, :8, :8], out[:, :, 8:16, 16:24])
    # Linearly separable by class: class means are far apart relative to the spread within a class.
    flat = delta.flatten(1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(10)])
    assert torch.cdist(means, means).fill_diagonal_(float("inf")).min() > 0.2


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


def test_fast_on_ten_thousand_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10_000, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(10_000) % 10
    for name in list_poisons():
        t0 = time.perf_counter()
        get_poison(name)(images, labels)
        assert time.perf_counter() - t0 < 30, name


def test_bad_input():
    with pytest.raises(TypeError, match="uint8 tensor of shape"):
        urp(torch.rand(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        urp(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3))
