"""The shared skeleton of the library's transforms: v2.Transform over images, batches flattened to (N, C, H, W)."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import functional as EF
from ._images import check_int, to_float_batch
from .denoiser import Denoiser, load_denoiser

__all__ = ["ImageTransform"]


def _is_pure_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)


class ImageTransform(v2.Transform):
    """Applies ``_apply_batch`` to each image leaf; labels, boxes and other leaves pass through untouched.

    Subclasses set ``accepts_uint8`` / ``check_range`` and implement ``_apply_batch(x, params)`` on a float32
    batch ``(N, C, H, W)``; conversion back to the input's type, shape, dtype and device happens here.

    Which leaves are images differs from torchvision's heuristic on purpose, because an image that passes
    through unpurified keeps its poison: every ``tv_tensors.Image``, every PIL image and every plain tensor with
    three or more dimensions is transformed (torchvision transforms only the first plain tensor of a sample). A
    lone plain tensor of fewer dimensions is transformed too, so that its shape is refused with a clear error.
    Plain tensors of 0-2 dimensions beside an image (labels, scores) pass through. Numpy arrays and videos,
    which torchvision passes through silently, are refused.
    """

    _transformed_types = (tv_tensors.Image, PIL.Image.Image, _is_pure_tensor)
    accepts_uint8: bool = True
    check_range: bool = True

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        for inpt in flat_inputs:
            if isinstance(inpt, np.ndarray) and inpt.ndim >= 2:
                raise TypeError(
                    f"{type(self).__name__} got a numpy array of shape {inpt.shape}, which it would pass through "
                    "unchanged (poison included); convert images to tensors first: v2.ToImage() for (H, W, C) "
                    "uint8 arrays, or torch.from_numpy(x).permute(2, 0, 1)."
                )
            if isinstance(inpt, tv_tensors.Video):
                raise TypeError(
                    f"{type(self).__name__} does not transform tv_tensors.Video; pass the frames as a "
                    "tv_tensors.Image batch (T, C, H, W) instead."
                )

    def _needs_transform_list(self, flat_inputs: list[Any]) -> list[bool]:
        def is_image(inpt: Any) -> bool:
            return isinstance(inpt, (tv_tensors.Image, PIL.Image.Image)) or (_is_pure_tensor(inpt) and inpt.ndim >= 3)

        needs = [is_image(inpt) for inpt in flat_inputs]
        if not any(needs):  # no image at all: the first plain tensor is meant as one (and its shape is checked)
            first = next((i for i, inpt in enumerate(flat_inputs) if _is_pure_tensor(inpt)), None)
            if first is not None:
                needs[first] = True
        return needs

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        is_float_tensor = isinstance(inpt, torch.Tensor) and inpt.is_floating_point()
        if not self.accepts_uint8 and not is_float_tensor:
            raise TypeError(
                f"{type(self).__name__} needs a float image tensor in [0, 1] (its output leaves [0, 1] and cannot "
                f"be stored as uint8 or PIL), got {type(inpt).__name__}"
                f"{'' if not isinstance(inpt, torch.Tensor) else f' of dtype {inpt.dtype}'}; "
                "put v2.ToImage() and v2.ToDtype(torch.float32, scale=True) before it, or use EclipsePurify."
            )
        x, restore = to_float_batch(inpt, name="image", check_range=self.check_range)
        return restore(self._apply_batch(x, params))

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class DiffusionTransform(ImageTransform):
    """Base of the transforms that hold a :class:`~eclipse_transforms.Denoiser` and a seed.

    ``denoiser`` is a ``Denoiser``, a folder or Hub repo id (loaded with ``revision``), or ``None`` for the
    bundled weights (or for no denoiser at all, with ``required=False``). With an int ``seed`` every image's
    randomness is derived from ``(seed, image content)``, so the output is a function of the image alone (batched
    == unbatched); with ``None`` a fresh seed is drawn from torch's global RNG on every call.
    """

    def __init__(
        self,
        denoiser: Any = None,
        *,
        t_star: int = 100,
        seed: int | None = None,
        revision: str | None = None,
        required: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, Denoiser) and (denoiser is not None or required):
            denoiser = load_denoiser(denoiser, revision=revision)
        # required=False (a transform that may run no diffusion): None stays None, nothing is loaded.
        self.denoiser = denoiser
        self.t_star = (
            EF.check_t_star(t_star, denoiser) if denoiser is not None else check_int(t_star, "t_star", minimum=1)
        )
        self.seed = check_int(seed, "seed", optional=True)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return {"seed": seed}

    def extra_repr(self) -> str:
        # v2.Transform builds extra_repr from public attributes; the denoiser is summarised, not expanded.
        names = [n for n in ("t_star", "steps", "seed") if hasattr(self, n)]
        shown = [f"denoiser={self.denoiser.source!r}"] + [f"{n}={getattr(self, n)!r}" for n in names]
        if self.denoiser.dtype != torch.float32:  # the default precision goes unsaid
            shown.insert(1, f"dtype={self.denoiser.dtype}")
        return ", ".join(shown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
