"""Functional form of the three ECLIPSE stages, with explicit randomness (``generator=``).

All functions take float image batches ``(N, C, H, W)`` in ``[0, 1]`` (the noise stage's output may leave that
range) and return the same layout. The DDPM's ``[-1, 1]`` range exists only inside :func:`forward_diffusion` and
:func:`reverse_diffusion`. ``generator`` is ``None`` (torch's global RNG), one ``torch.Generator`` for the whole batch, or a
sequence of generators with one per image, which makes every image's output independent of the batch it is in.

Timesteps follow the paper (1-indexed DDPM notation, ``t_star`` in ``[1, T]``): the noisy image ``x_{t*}`` uses
``ᾱ_{t*}``, which is diffusers' ``scheduler.alphas_cumprod[t_star - 1]`` (diffusers counts timesteps from 0).
The paper's sampler then takes exactly ``t_star`` ancestral steps, at diffusers timesteps ``t_star - 1, …, 0``.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torchvision.transforms.v2 import functional as F

from ._images import check_channels, check_float_images, check_int
from .denoiser import Denoiser

__all__ = [
    "forward_diffusion",
    "reverse_diffusion",
    "purify",
    "corruption_compensation",
    "despeckle",
    "repair_border",
    "jpeg_compression",
    "sampling_timesteps",
    "check_t_star",
    "check_steps",
    "check_images",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


def check_t_star(t_star: int, denoiser: Denoiser) -> int:
    """Validate ``t_star`` against the schedule length ``T`` and the range the weights were trained for."""
    t_star = check_int(t_star, "t_star")
    T = denoiser.num_train_timesteps
    if not 1 <= t_star <= T:
        raise ValueError(f"t_star must be in [1, {T}] (the denoiser's num_train_timesteps), got {t_star}.")
    if t_star > denoiser.t_max:
        raise ValueError(
            f"t_star={t_star} is above t_max={denoiser.t_max}, the largest timestep these weights were trained "
            f"for; use t_star <= {denoiser.t_max} or weights trained with a larger t_max."
        )
    return t_star


def check_steps(steps: int | None, t_star: int) -> int:
    """``steps=None`` means the paper's sampler: one ancestral step per timestep, ``t_star`` steps."""
    checked = check_int(steps, "steps", optional=True)
    if checked is None:
        return t_star
    steps = checked
    if not 1 <= steps <= t_star:
        raise ValueError(
            f"steps must be in [1, t_star={t_star}] (None for the paper's {t_star}-step sampler), got {steps}."
        )
    return steps


def sampling_timesteps(t_star: int, steps: int | None = None) -> list[int]:
    """Diffusers timesteps visited by the reverse process from ``x_{t*}``, in decreasing order.

    ``steps = t_star`` (or None) is the paper's ancestral sampler ``[t*-1, …, 0]``. Fewer steps respace that
    range evenly (improved-diffusion's ``respace``; the scheduler recomputes each step's β from ``ᾱ``).
    ``steps = 1`` is ``[t*-1]``: a single step to ``t = 0``, whose posterior variance is zero, so it returns the
    model's one-step estimate of ``x_0`` (formula (15) of Ho et al. 2020).

    Example:
        >>> sampling_timesteps(10, 4)
        [9, 6, 3, 0]
    """
    steps = check_steps(steps, t_star)
    if steps == 1:
        return [t_star - 1]
    return [int(t) for t in np.linspace(t_star - 1, 0, steps).round().astype(np.int64)]


def _randn(n: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise ``(n, *shape)`` in float32 on ``device``, through diffusers' ``randn_tensor``: CPU
    generators draw on the CPU (the same noise on any device), one generator per image draws that image's noise."""
    if isinstance(generator, Sequence):
        if len(generator) != n:
            raise ValueError(f"generator must be one torch.Generator or one per image ({n}), got {len(generator)}.")
        generator = list(generator)
    return randn_tensor((n, *shape), generator=generator, device=torch.device(device), dtype=torch.float32)


def check_images(x: torch.Tensor, denoiser: Denoiser, name: str, check_range: bool) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise TypeError(f"{name} must be a float tensor of shape (N, C, H, W).")
    check_float_images(x, name=name, check_range=check_range)
    check_channels(x.shape, denoiser.in_channels, name=name)
    m = denoiser.size_multiple
    h, w = x.shape[-2:]
    if h % m or w % m:
        raise ValueError(
            f"{name} height and width must be multiples of {m} for this denoiser's UNet, got {h}x{w}; "
            f"resize or pad (e.g. v2.CenterCrop or v2.Resize to {max(m, h - h % m)}x{max(m, w - w % m)})."
        )


def forward_diffusion(
    x: torch.Tensor, denoiser: Denoiser, t_star: int, *, generator: Generators = None
) -> torch.Tensor:
    """Forward diffusion of clean images to ``x_{t*}`` (formula (4) of Ho et al. 2020).

    ``x_{t*} = sqrt(ᾱ_{t*}) x + sqrt(1 - ᾱ_{t*}) ε`` in the model's ``[-1, 1]`` space, via diffusers'
    ``DDPMScheduler.add_noise``.

    Args:
        x: float images ``(N, C, H, W)`` in ``[0, 1]``.
        denoiser: gives the noise schedule.
        t_star: diffusion time in ``[1, min(T, t_max)]``.
        generator: see the module docstring.

    Returns:
        ``x_{t*}`` mapped back with ``y / 2 + 0.5``: float32 ``(N, C, H, W)``, values partly outside ``[0, 1]``.
    """
    t_star = check_t_star(t_star, denoiser)
    check_images(x, denoiser, "x", check_range=True)
    eps = _randn(x.shape[0], tuple(x.shape[1:]), generator, x.device)
    timesteps = torch.full((x.shape[0],), t_star - 1, dtype=torch.long, device=x.device)
    noisy = denoiser.scheduler.add_noise(x.to(torch.float32) * 2 - 1, eps, timesteps)
    return noisy / 2 + 0.5


def reverse_diffusion(
    noisy: torch.Tensor,
    denoiser: Denoiser,
    t_star: int,
    *,
    steps: int | None = None,
    generator: Generators = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Reverse DDPM from ``x_{t*}`` to ``x_0`` with diffusers' ``DDPMScheduler.step`` (ancestral sampling).

    Args:
        noisy: ``x_{t*}`` as returned by :func:`forward_diffusion` (float ``(N, C, H, W)``, image space ``y / 2 + 0.5``).
        denoiser: the noise predictor and its schedule. Runs on its own device; the result returns to ``noisy``'s.
        t_star: the diffusion time of ``noisy``.
        steps: ``None`` or ``t_star`` for the paper's sampler, fewer for a respaced schedule, 1 for the one-step
            ``x_0`` estimate (see :func:`sampling_timesteps`).
        generator: see the module docstring; draws one ``(C, H, W)`` noise per image and step, except the last.
        differentiable: keep the autograd graph (for attacks that backpropagate through the purifier, e.g. the
            bench's adaptive poison). Default: run under ``torch.inference_mode``.

    Returns:
        float32 images ``(N, C, H, W)`` in ``[0, 1]`` on ``noisy``'s device.
    """
    if not differentiable:
        with torch.inference_mode():
            return reverse_diffusion(noisy, denoiser, t_star, steps=steps, generator=generator, differentiable=True)
    t_star = check_t_star(t_star, denoiser)
    timesteps = sampling_timesteps(t_star, steps)
    check_images(noisy, denoiser, "noisy", check_range=False)
    scheduler = DDPMScheduler.from_config(denoiser.scheduler.config)  # a private copy: set_timesteps mutates
    scheduler.set_timesteps(timesteps=timesteps)
    device = denoiser.device
    sample = (noisy.to(device, torch.float32) * 2 - 1).to(denoiser.dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != sample.shape[0]:
            raise ValueError(f"generator must be one per image ({sample.shape[0]}), got {len(generator)}.")
    for t in scheduler.timesteps:
        eps = denoiser(sample, t.to(device))
        sample = scheduler.step(eps.float(), t, sample.float(), generator=generator).prev_sample
        sample = sample.to(denoiser.dtype)
    return (sample.float() / 2 + 0.5).clamp(0, 1).to(noisy.device)


def purify(
    x: torch.Tensor,
    denoiser: Denoiser,
    t_star: int = 100,
    *,
    steps: int | None = None,
    generator: Generators = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Noise then denoise: ``reverse_diffusion(forward_diffusion(x))`` with one generator stream per image.

    Args:
        x: float images ``(N, C, H, W)`` in ``[0, 1]``.
        denoiser, t_star, steps, generator, differentiable: as in :func:`forward_diffusion` and :func:`reverse_diffusion`.

    Returns:
        Purified float32 images ``(N, C, H, W)`` in ``[0, 1]``.
    """
    noisy = forward_diffusion(x, denoiser, t_star, generator=generator)
    return reverse_diffusion(noisy, denoiser, t_star, steps=steps, generator=generator, differentiable=differentiable)


def corruption_compensation(
    x: torch.Tensor, *, p_gray: float = 0.4, sigma: float = 0.05, generator: Generators = None
) -> torch.Tensor:
    """The paper's corruption compensation: random grayscale, then Gaussian noise, then clamp to ``[0, 1]``.

    Each image independently becomes grayscale (ITU-R 601-2 luma, as ``v2.Grayscale``, kept 3-channel) with
    probability ``p_gray``; then ``N(0, sigma²)`` noise is added to every pixel.

    Args:
        x: float images ``(N, C, H, W)`` in ``[0, 1]``, C = 1 or 3.
        p_gray: probability of grayscale per image.
        sigma: standard deviation of the noise, in ``[0, 1]`` image units.
        generator: see the module docstring.

    Returns:
        float images of ``x``'s shape and dtype in ``[0, 1]``.
    """
    n = x.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = "cpu" if generator is None else generator.device
        u = torch.rand(n, generator=generator, device=gen_device).to(x.device)
    else:
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generator]).to(x.device)
    out = x
    if x.shape[1] == 3 and p_gray > 0:
        gray = F.rgb_to_grayscale(x, num_output_channels=3)
        out = torch.where((u < p_gray).view(n, 1, 1, 1), gray, x)
    if sigma > 0:
        out = out + sigma * _randn(n, tuple(x.shape[1:]), generator, x.device).to(x.dtype)
    return out.clamp(0, 1)


_DESPECKLE_CHUNK_PIXELS = 1 << 22  # values per chunk of the median (its neighbourhoods take 9x as much)


def _median3x3(x: torch.Tensor) -> torch.Tensor:
    """Every channel's 3x3 median (reflect-padded) of float images ``(N, C, H, W)``."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.unfold(padded, 3).median(dim=1).values.view(n, c, h, w)


def despeckle(x: torch.Tensor, *, threshold: float = 32 / 255) -> torch.Tensor:
    """Replace the pixels that stand out from their 3x3 neighbourhood by its median; leave the others as they are.

    A pixel is an outlier when, in some channel, it differs from that channel's 3x3 median (reflect-padded) by
    more than ``threshold``; all its channels then take the medians. A one-pixel shortcut (OPS: one pixel per
    class set to an extreme colour) is such an outlier, while about 5 % of a natural CIFAR-10 image's pixels move
    at the default threshold.

    Args:
        x: float images ``(N, C, H, W)`` in ``[0, 1]``, H and W at least 2.
        threshold: in ``[0, 1]`` image units (32/255 by default).

    Returns:
        float images of ``x``'s shape and dtype.

    Example:
        >>> x = torch.full((1, 3, 5, 5), 0.5)
        >>> x[0, :, 2, 2] = 1.0  # one saturated pixel
        >>> bool((despeckle(x) == 0.5).all())
        True
    """
    # the 3x3 neighbourhoods are 9 copies of the batch: a few thousand CIFAR-10 images at a time, not 50,000 at once
    chunk = max(1, _DESPECKLE_CHUNK_PIXELS // max(1, x.shape[1:].numel()))
    median = torch.cat([_median3x3(part) for part in x.split(chunk)])  # an empty batch is one empty chunk
    # 1e-6: a uint8 difference of exactly the threshold (in levels) is not an outlier, whatever the float rounding
    outlier = (x - median).abs().amax(1, keepdim=True) > threshold + 1e-6
    return torch.where(outlier, median, x)


def repair_border(x: torch.Tensor, *, width: int = 1) -> torch.Tensor:
    """Replace the outermost ``width`` rings of pixels by copies of the ring just inside them (edge-replicated).

    Args:
        x: float images ``(N, C, H, W)``, H and W greater than ``2 * width``.
        width: how many rings to replace (at least 1).

    Returns:
        float images of ``x``'s shape and dtype; the interior is ``x``'s, bit for bit.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> repair_border(x)[0, 0]
        tensor([[ 5.,  5.,  6.,  6.],
                [ 5.,  5.,  6.,  6.],
                [ 9.,  9., 10., 10.],
                [ 9.,  9., 10., 10.]])
    """
    width = check_int(width, "width")
    if width < 1:
        raise ValueError(f"width must be at least 1 (rings of pixels), got {width}.")
    h, w = x.shape[-2:]
    if min(h, w) <= 2 * width:
        raise ValueError(
            f"repair_border(width={width}) needs images larger than {2 * width}x{2 * width} pixels, got {h}x{w}."
        )
    inner = x[..., width:-width, width:-width]
    return torch.nn.functional.pad(inner, (width, width, width, width), mode="replicate")


def jpeg_compression(x: torch.Tensor, *, quality: int = 10) -> torch.Tensor:
    """Encode and decode every image of ``x`` as JPEG at ``quality`` (Pillow, 4:2:0 chroma), as ISS-JPEG does.

    Coarse quantisation of the 8x8 DCT blocks absorbs small perturbations: at quality 10 it breaks the adversarial
    poisons (SEP, TAP, REM, EM) that diffusion at small t* keeps, at a cost in detail.

    Args:
        x: float images ``(N, 3, H, W)`` in ``[0, 1]`` (rounded to uint8 levels before encoding).
        quality: JPEG quality in ``[1, 100]``.

    Returns:
        float32 images of ``x``'s shape on ``x``'s device, on the 256 uint8 levels.

    Example:
        >>> out = jpeg_compression(torch.rand(2, 3, 16, 16), quality=10)
        >>> out.shape, bool((out * 255 == (out * 255).round()).all())
        (torch.Size([2, 3, 16, 16]), True)
    """
    quality = check_int(quality, "quality")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}.")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"jpeg_compression needs RGB images (N, 3, H, W), got shape {tuple(x.shape)}; make grayscale images "
            "RGB first (v2.RGB())."
        )
    images = x.detach().to("cpu", torch.float32).mul(255).round_().clamp_(0, 255).to(torch.uint8)
    out = torch.empty_like(images)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = torch.from_numpy(np.array(PIL.Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out.to(x.device).float() / 255


def _deprecated(old: str, new: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``old``, the name ``new`` had before each stage got one name across class, module and function."""

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> torch.Tensor:
        warnings.warn(
            f"eclipse_transforms.functional.{old} is deprecated; use {new.__name__} (the name of its class's stage).",
            FutureWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__doc__ = f"Deprecated name of :func:`{new.__name__}`."
    return alias


diffuse = _deprecated("diffuse", forward_diffusion)
denoise = _deprecated("denoise", reverse_diffusion)
compensate = _deprecated("compensate", corruption_compensation)
