"""``JPEGCompression``: JPEG at a fixed quality, the squeezing stage of ISS-JPEG, as a deterministic transform."""

from __future__ import annotations

from typing import Any

from . import functional as EF
from ._base import ImageTransform
from ._images import check_int

__all__ = ["JPEGCompression"]


class JPEGCompression(ImageTransform):
    """Encode and decode images as JPEG at ``quality`` (Pillow), the same bytes on every call.

    Unlike ``v2.JPEG`` it is deterministic at a fixed quality, so it can go before :class:`PurifiedDataset`'s cache
    (as ``EclipsePurify(prefilter=...)``), and it does not rely on torchvision's image encoders, which
    torchvision 0.29 deprecates.

    Args:
        quality: JPEG quality in ``[1, 100]``; ISS-JPEG uses 10.

    Input: RGB float images ``(..., 3, H, W)`` in ``[0, 1]``, uint8 tensors, ``tv_tensors.Image`` or PIL images;
    the output keeps the input's type, dtype and device.

    Example:
        >>> import torch
        >>> out = JPEGCompression(quality=10)(torch.rand(3, 32, 32))
        >>> out.shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, quality: int = 10) -> None:
        super().__init__()
        self.quality = check_int(quality, "quality")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}.")

    def _apply_batch(self, x: Any, params: dict[str, Any]) -> Any:
        return EF.jpeg_compression(x, quality=self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}"
