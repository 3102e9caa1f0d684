"""Model-free availability poisons, generated from their published algorithms and constants.

Every poison takes uint8 images ``(N, 3, H, W)`` and int labels ``(N,)`` and returns uint8 poisoned images of the
same shape, deterministic under ``seed``. Perturbations are computed in float ``[0, 1]`` units and the poisoned
image is **rounded to the nearest uint8 level** (``round(255 · clip(x + δ, 0, 1))``), so an L∞ budget of
``k/255`` is kept exactly and L2 budgets hold up to rounding.

Registry (timm-style)::

    >>> from eclipse_transforms.bench.poisons import list_poisons, get_poison
    >>> list_poisons()
    ['adp', 'ar', 'cuda', 'em', 'lsp', 'ops', 'rem', 'sep', 'tap', 'urp']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as nnf

from ..utils import quantize
from .registry import Registry

__all__ = [
    "register_poison",
    "list_poisons",
    "get_poison",
    "check_poison_inputs",
    "check_positive",
    "check_count",
    "num_classes",
    "urp",
    "lsp",
    "ar",
    "ops",
    "cuda",
    "cuda_kernels",
]

PoisonFn = Callable[..., torch.Tensor]
_POISONS: Registry[PoisonFn] = Registry("poison")


def register_poison(name: str) -> Callable[[PoisonFn], PoisonFn]:
    """Register a poison generator under ``name`` (lower case)."""
    return _POISONS.register(name)


def list_poisons() -> list[str]:
    return _POISONS.names()


def get_poison(name: str) -> PoisonFn:
    return _POISONS.get(name)


def check_poison_inputs(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What every poison checks first: uint8 ``(N, 3, H, W)`` images and ``N`` non-negative integer labels.

    Returns the images and the labels as int64; float labels are accepted only when they are whole numbers (a
    label is never truncated). A poison written for :func:`register_poison` calls this before anything else.

        >>> images, labels = check_poison_inputs(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [1.0, 0.0])
        >>> labels
        tensor([1, 0])
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError("images must be a uint8 tensor of shape (N, 3, H, W).")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must be integer class indices; got fractional values, which are never truncated.")
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    labels = labels.to(torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be non-negative class indices.")
    return images, labels


def num_classes(labels: torch.Tensor) -> int:
    """Classes a poison makes patterns for: the largest label + 1 (0 for no labels)."""
    return int(labels.max()) + 1 if len(labels) else 0


def _class_indices(labels: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(class, indices of its images in order)`` for every class that has images."""
    for cls in range(num_classes(labels)):
        idx = torch.nonzero(labels == cls).flatten()
        if len(idx):
            yield cls, idx


def check_positive(name: str, value: Any, *, zero: bool = False) -> None:
    """Refuse a poison setting that is not a number above 0 (or at least 0): it would give no poison, or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if zero else value > 0):
        raise ValueError(f"{name} must be a number {'>= 0' if zero else '> 0'}; got {value!r}.")


def check_count(name: str, value: Any, *, low: int = 1) -> None:
    """Refuse a poison setting that counts something (steps, images, ...) unless it is an int ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


def _scale_l2(delta: torch.Tensor, l2: float) -> torch.Tensor:
    """Scale every perturbation of ``delta`` (``(N, ...)``) to L2 norm ``l2``."""
    return delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1)) * l2


def _apply(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return quantize((images.float() / 255 + delta).clamp(0, 1))


@register_poison("urp")
def urp(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, epsilon: float = 8 / 255) -> torch.Tensor:
    """Class-wise random noise: one fixed pattern per class, uniform in ``[-ε, ε]`` per pixel and channel.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        labels: class indices ``(N,)``.
        seed: seed of the class patterns.
        epsilon: L∞ budget (default 8/255).
    """
    images, labels = check_poison_inputs(images, labels)
    check_positive("epsilon", epsilon)
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand((num_classes(labels), *images.shape[1:]), generator=g) * 2 - 1) * epsilon
    return _apply(images, patterns[labels])


def _linearly_separable_points(
    counts: list[int], dim: int, class_sep: float, g: torch.Generator
) -> list[torch.Tensor]:
    """sklearn ``make_classification`` (n_informative=dim, one cluster per class, hypercube=True, flip_y=0):
    class centroids on distinct vertices of the hypercube ``{±class_sep}^dim``, points ``N(0, I) @ A_c + centroid``
    with ``A_c`` uniform in ``[-1, 1]``."""
    vertices: set[tuple[int, ...]] = set()
    points = []
    for n in counts:
        while True:
            vertex = tuple((torch.randint(0, 2, (dim,), generator=g) * 2 - 1).tolist())
            if vertex not in vertices:
                vertices.add(vertex)
                break
        centroid = torch.tensor(vertex, dtype=torch.float64) * class_sep
        a = torch.rand((dim, dim), generator=g, dtype=torch.float64) * 2 - 1
        points.append(torch.randn((n, dim), generator=g, dtype=torch.float64) @ a + centroid)
    return points


@register_poison("lsp")
def lsp(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    patch: int = 8,
    class_sep: float = 10.0,
    l2: float | None = None,
) -> torch.Tensor:
    """Linearly separable perturbations (Yu et al., KDD 2022).

    One cluster of synthetic points per class (sklearn ``make_classification`` recipe, class separation 10) in
    ``3·(H/patch)·(W/patch)`` dimensions (48 for 32x32 and patch 8); the k-th point of class c becomes the
    perturbation of the k-th image of class c: reshaped to ``3 x H/patch x W/patch``, each value upsampled
    (nearest) to a ``patch x patch`` patch, and scaled to L2 = ``(6/255)·sqrt(3·H·W)`` (≈ 1.30 for 32x32).

    Args:
        images, labels, seed: as for every poison.
        patch: side of the constant patches (the paper's 8).
        class_sep: separation of the class clusters.
        l2: per-image L2 norm of the perturbation; default ``(6/255)·sqrt(3·H·W)``.
    """
    images, labels = check_poison_inputs(images, labels)
    n, c, h, w = images.shape
    check_positive("class_sep", class_sep)
    if l2 is not None:
        check_positive("l2", l2)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch must be an int >= 1 that divides the image size {h}x{w}, got {patch!r}.")
    l2 = (6 / 255) * (c * h * w) ** 0.5 if l2 is None else l2
    g = torch.Generator().manual_seed(seed)
    counts = [int((labels == cls).sum()) for cls in range(num_classes(labels))]
    points = _linearly_separable_points(counts, c * (h // patch) * (w // patch), class_sep, g)
    delta = torch.empty((n, c, h, w), dtype=torch.float64)
    for cls, idx in _class_indices(labels):  # the k-th image of the class gets the k-th point
        p = points[cls].view(-1, c, h // patch, w // patch)
        delta[idx] = p.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return _apply(images, _scale_l2(delta, l2).float())


def _ar_fill(coeffs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Fill ``start`` (``(n, 3, H, W)``) in raster order with the causal AR process ``coeffs`` (``(3, 3, 3)``, the
    bottom-right tap of each channel's window being the pixel itself, coefficient 0), no innovation noise."""
    x = start.clone()
    h, w = x.shape[-2:]
    c = coeffs.view(1, 3, 9)
    for i in range(2, h):
        for j in range(2, w):
            window = x[:, :, i - 2 : i + 1, j - 2 : j + 1].reshape(x.shape[0], 3, 9)
            x[:, :, i, j] = (window * c).sum(-1)
    return x


def _ar_response(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image norm of the AR filter ``x_ij - Σ β x_past`` of ``coeffs`` over ``x``, relative to ``‖x‖``."""
    weight = -coeffs.clone().view(3, 1, 3, 3)
    weight[:, 0, 2, 2] = 1.0
    r = nnf.conv2d(x, weight, groups=3)
    return r.flatten(1).norm(dim=1) / x[:, :, 2:, 2:].flatten(1).norm(dim=1).clamp_min(1e-12)


def _ar_coefficients(
    k: int, g: torch.Generator, min_response: float, size: tuple[int, int], probes: int = 8, max_l1: float = 3.0
) -> torch.Tensor:
    """The paper's rejection search: per class, 8 causal N(0,1) coefficients per channel normalised to sum to 1,
    kept only if its filter and every earlier class's filter respond to each other's processes with at least
    ``min_response`` (relative norm), so no class's filter also annihilates another class's perturbation.
    Processes that blow up over an image of ``size`` (start included) are rejected too."""
    accepted: list[torch.Tensor] = []
    samples: list[torch.Tensor] = []
    for _ in range(100_000):
        if len(accepted) == k:
            break
        beta = torch.randn((3, 9), generator=g)
        beta[:, 8] = 0
        beta = beta / beta.sum(-1, keepdim=True)
        if beta.abs().sum(-1).max() > max_l1:  # cheap pre-screen: large coefficients make the process blow up
            continue
        beta = beta.view(3, 3, 3)
        sample = _ar_fill(beta, torch.randn((probes, 3, *size), generator=g))[:, :, 4:, 4:]
        if not torch.isfinite(sample).all() or sample.abs().max() > 1e3:
            continue
        ok = all(
            _ar_response(beta, other).min() >= min_response and _ar_response(coef, sample).min() >= min_response
            for coef, other in zip(accepted, samples, strict=True)
        )
        if ok:
            accepted.append(beta)
            samples.append(sample)
    if len(accepted) < k:
        raise RuntimeError(f"found only {len(accepted)} of {k} AR processes; lower min_response.")
    return torch.stack(accepted)


@register_poison("ar")
def ar(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    l2: float = 1.0,
    min_response: float = 0.5,
) -> torch.Tensor:
    """Autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022).

    One 3x3 causal AR process per class and channel (8 coefficients, found by rejection search so each class's
    AR filter responds strongly to the other classes' processes). Each image gets a fresh process: an
    ``N(0, 1)`` start of size ``(H+4) x (W+4)``, filled in raster order with no innovation noise, the last
    ``H x W`` kept, scaled to L2 = ``l2`` (1.0, not an L∞ 8/255 budget). The recursion runs batched over all
    images of a class.
    """
    images, labels = check_poison_inputs(images, labels)
    n, c, h, w = images.shape
    check_positive("l2", l2)
    check_positive("min_response", min_response, zero=True)
    g = torch.Generator().manual_seed(seed)
    coeffs = _ar_coefficients(num_classes(labels), g, min_response, (h + 4, w + 4))
    delta = torch.empty((n, c, h, w))
    for cls, idx in _class_indices(labels):
        x = _ar_fill(coeffs[cls], torch.randn((len(idx), 3, h + 4, w + 4), generator=g))[:, :, 4:, 4:]
        delta[idx] = _scale_l2(x, l2)
    return _apply(images, delta)


@register_poison("ops")
def ops(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """One-pixel shortcut (Wu et al., ICLR 2023): one pixel per class set to one corner of the RGB cube.

    For each class in turn, every (pixel, corner colour) pair is scored by mean / std of ``|colour − pixel|`` over
    the class's images and channels; the best pair not taken by an earlier class is written into every image of
    the class. Deterministic given the data (``seed`` is unused and accepted for a uniform interface). L0 = 1 pixel.
    """
    images, labels = check_poison_inputs(images, labels)
    n, c, h, w = images.shape
    corners = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32)
    out = images.clone()
    taken: set[tuple[int, int]] = set()
    for _, idx in _class_indices(labels):
        x = images[idx].float().div(255).flatten(2)  # (m, 3, HW)
        scores = torch.empty(8, h * w)
        for j, colour in enumerate(corners):
            diff = (colour.view(1, 3, 1) - x).abs()  # (m, 3, HW)
            scores[j] = diff.mean((0, 1)) / diff.std((0, 1)).clamp_min(1e-6)
        for flat in torch.argsort(scores.flatten(), descending=True).tolist():
            colour_idx, pixel = divmod(flat, h * w)
            if (pixel, colour_idx) not in taken:
                taken.add((pixel, colour_idx))
                break
        value = (corners[colour_idx] * 255).to(torch.uint8)
        rows = out[idx].flatten(2)
        rows[:, :, pixel] = value.view(1, 3)
        out[idx] = rows.view(len(idx), c, h, w)
    return out


def cuda_kernels(classes: int, *, seed: int = 0, blur: float = 0.3) -> torch.Tensor:
    """The ``(classes, 3, 3)`` kernels :func:`cuda` convolves each class with: weights ``U(0, blur)``, one random
    tap per kernel set to 1.0 (drawn from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    kernels = torch.rand((classes, 3, 3), generator=g) * blur
    taps = torch.randint(0, 9, (classes,), generator=g)
    kernels.view(classes, 9)[torch.arange(classes), taps] = 1.0
    return kernels


@register_poison("cuda")
def cuda(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, blur: float = 0.3) -> torch.Tensor:
    """Convolution-based unlearnable data (Sadasivan et al., CVPR 2023). Unbounded.

    Per class a 3x3 kernel with weights ``U(0, blur)`` and one random tap set to 1.0, applied depthwise (the same
    kernel on every channel, zero padding); each image is then divided by its own maximum.
    """
    images, labels = check_poison_inputs(images, labels)
    check_positive("blur", blur, zero=True)
    kernels = cuda_kernels(num_classes(labels), seed=seed, blur=blur)
    x = images.float() / 255
    out = torch.empty_like(x)
    for cls, idx in _class_indices(labels):
        out[idx] = nnf.conv2d(x[idx], kernels[cls].expand(3, 1, 3, 3), padding=1, groups=3)
    out = out / out.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return quantize(out)
