"""Input checks and conversions shared by the transforms: one place that says what an image may be."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

# Float images may exceed [0, 1] by this much (rounding in upstream transforms) before they are refused.
RANGE_TOLERANCE = 1e-4


def check_float_images(x: torch.Tensor, *, name: str = "image", check_range: bool = True) -> None:
    """Refuse NaN/inf and, with ``check_range``, float images outside ``[0, 1]``, naming the fix."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf pixels; purification needs finite values in [0, 1].")
    if check_range and x.numel():
        lo, hi = x.min().item(), x.max().item()
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            hint = (
                " It looks like 0-255 values stored as float: divide by 255 or use "
                "v2.ToDtype(torch.float32, scale=True)."
                if hi > 2
                else " It looks normalized (e.g. by v2.Normalize): purify before normalizing."
            )
            raise ValueError(f"{name} must be a float image in [0, 1], got values in [{lo:.3g}, {hi:.3g}].{hint}")


def check_channels(channels: int, expected: int, *, name: str = "image") -> None:
    if channels != expected:
        fix = "convert it to RGB (e.g. PIL's .convert('RGB') or v2.RGB())" if expected == 3 else ""
        raise ValueError(
            f"{name} must have {expected} channels in dimension -3 (shape (..., C, H, W)), got {channels}. {fix}"
        )


def to_float_batch(
    inpt: torch.Tensor | PIL.Image.Image, *, name: str = "image", check_range: bool = True
) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Flatten an image input to a float32 batch ``(N, C, H, W)`` in ``[0, 1]`` and return how to undo it.

    Accepts PIL images, uint8 tensors and float tensors of shape ``(..., C, H, W)`` (plain or
    ``tv_tensors.Image``). The returned ``restore`` maps a float batch back to the input's type, shape, dtype
    and device; uint8 outputs are rounded to the nearest level (``round(255 * x)``).
    """
    if isinstance(inpt, PIL.Image.Image):
        if inpt.mode != "RGB":
            raise ValueError(
                f"{name} must be an RGB PIL image, got mode {inpt.mode!r}; use image.convert('RGB') first."
            )
        x = F.pil_to_tensor(inpt).to(torch.float32).div_(255).unsqueeze(0)
        return x, lambda y: F.to_pil_image(quantize(y[0]))
    if not isinstance(inpt, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or PIL image, got {type(inpt).__name__}.")
    if inpt.ndim < 3:
        raise ValueError(
            f"{name} must have shape (..., C, H, W), got a {inpt.ndim}-d tensor of shape {tuple(inpt.shape)}."
        )
    shape, dtype, device = inpt.shape, inpt.dtype, inpt.device
    plain = inpt.as_subclass(torch.Tensor)
    if dtype == torch.uint8:
        x = plain.to(torch.float32) / 255
    elif dtype.is_floating_point:
        check_float_images(plain, name=name, check_range=check_range)
        x = plain.to(torch.float32)
    else:
        raise TypeError(f"{name} must be uint8 or floating point, got dtype {dtype}.")
    x = x.reshape(-1, *shape[-3:])

    def restore(y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*shape[:-3], *y.shape[-3:]).to(device)
        y = quantize(y) if dtype == torch.uint8 else y.to(dtype)
        return tv_tensors.wrap(y, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else y

    return x, restore


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float ``[0, 1]`` to uint8 by rounding to the nearest of the 256 levels."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any reprs, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def content_generators(x: torch.Tensor, seed: int) -> list[torch.Generator]:
    """One CPU generator per image of ``x`` (``(N, ...)``), seeded from ``seed`` and the image's bytes.

    Seeding by content makes a seeded transform a function of each image alone: the same image gives the same
    output whether it comes alone or inside a batch, at any position.
    """
    flat = x.detach().to("cpu", torch.float32).contiguous()
    return [
        torch.Generator().manual_seed(derive_seed(seed, hashlib.blake2b(img.numpy().tobytes()).hexdigest()))
        for img in flat
    ]


def index_generators(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per dataset index, seeded from ``(seed, index)``: independent of the batch size."""
    return [torch.Generator().manual_seed(derive_seed(seed, int(i))) for i in indices]
