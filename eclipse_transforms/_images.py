"""Input checks and conversions shared by the transforms: one place that says what an image may be."""

from __future__ import annotations

import functools
import hashlib
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import numpy as np
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
            if lo < -RANGE_TOLERANCE:  # only normalisation (x - mean) / std makes pixels negative
                hint = (
                    " Negative values mean normalized images (e.g. by v2.Normalize with ImageNet or CIFAR "
                    "statistics): purify before normalizing, i.e. put v2.Normalize after this transform."
                )
            elif hi > 2:
                hint = (
                    " It looks like 0-255 values stored as float: divide by 255 or use "
                    "v2.ToDtype(torch.float32, scale=True)."
                )
            else:
                hint = " Clamp the images to [0, 1] (e.g. x.clamp(0, 1)) before purifying."
            raise ValueError(f"{name} must be a float image in [0, 1], got values in [{lo:.3g}, {hi:.3g}].{hint}")


def check_channels(shape: Sequence[int], expected: int, *, name: str = "image") -> None:
    """Refuse images of ``shape`` (``(..., C, H, W)``) without ``expected`` channels, saying what to do."""
    channels = shape[-3]
    if channels == expected:
        return
    if shape[-1] == expected:
        fix = (
            f"Its last dimension is {expected}: it looks channels-last (H, W, C), as numpy and PIL arrays are; "
            "move the channels first with x.permute(2, 0, 1) (batches: x.permute(0, 3, 1, 2)) or v2.ToImage()."
        )
    elif expected == 3:
        fix = "Convert it to RGB (e.g. PIL's .convert('RGB') or v2.RGB())."
    else:
        fix = ""
    raise ValueError(
        f"{name} must have {expected} channels in dimension -3 (shape (..., C, H, W)), got shape "
        f"{tuple(shape)}. {fix}".rstrip()
    )


@overload
def check_int(value: Any, name: str, *, minimum: int | None = None, optional: Literal[False] = False) -> int: ...


@overload
def check_int(value: Any, name: str, *, minimum: int | None = None, optional: bool) -> int | None: ...


def check_int(value: Any, name: str, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a plain ``int`` (Python or numpy integer, not bool), at least ``minimum``, or a clear error.

    Returning a plain ``int`` matters: seeds are hashed through ``repr``, where ``np.int64(0)`` is not ``0``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return int(value)


def as_index(value: Any, name: str = "index") -> int:
    """An integer index from an int, a numpy integer or a one-element integer tensor; floats and bools refused."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer (an int, numpy integer or one-element integer tensor), got "
            f"{value!r} ({type(value).__name__})."
        ) from None


def as_label(value: Any, name: str = "label") -> int:
    """A class label as a plain ``int``; a float is accepted only when it is a whole number (nothing is lost)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer class index, got the bool {value!r}.")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise TypeError(
        f"{name} must be an integer class index, got {value!r} ({type(value).__name__}); labels are never "
        "rounded or truncated. Map them to ints 0..K-1 (e.g. with the wrapped dataset's target_transform)."
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
        hint = (
            " Convert a numpy (H, W, C) image with v2.ToImage() or torch.from_numpy(x).permute(2, 0, 1)."
            if isinstance(inpt, np.ndarray)
            else ""
        )
        raise TypeError(f"{name} must be a torch.Tensor or PIL image, got {type(inpt).__name__}.{hint}")
    if inpt.ndim < 3:
        raise ValueError(
            f"{name} must have shape (..., C, H, W), got a {inpt.ndim}-d tensor of shape {tuple(inpt.shape)}."
            + (" A 2-d image is grayscale: the denoiser needs RGB (C = 3)." if inpt.ndim == 2 else "")
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


def keeps_global_rng(fn: Callable) -> Callable:
    """Decorate ``fn`` so that it leaves torch's global random state as it found it (CPU and every CUDA device).

    The trainer and the bench's classifier seed torch's global generator for weight initialisation and dropout;
    a library must not move its caller's random stream, so they run inside ``torch.random.fork_rng``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            return fn(*args, **kwargs)

    return wrapper


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
