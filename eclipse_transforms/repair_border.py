"""``RepairBorder``: replace the outermost pixel rings by the ring inside them (a zero-padded poison's border)."""

from __future__ import annotations

from typing import Any

from . import functional as EF
from ._base import ImageTransform
from ._images import check_int

__all__ = ["RepairBorder"]


class RepairBorder(ImageTransform):
    """Replace the outermost ``width`` rings of pixels by copies of the ring just inside them.

    A poison that convolves every image of a class with that class's kernel over zero padding (CUDA) darkens the
    image's edges by a class-specific amount: on the bench's CUDA set, a linear probe reads the class from the
    border's brightness alone for 91 % of the images (13 % on clean images). JPEG at quality 20 removes most of
    CUDA's other cue, the class-wise blur of the interior, but keeps the border; the two together take both
    (``benchmarks/cuda_cues.py``; CUDA trains to 41.8 % after border repair and JPEG q20, against 24.7 % and 31.1 %
    after either alone, on the bench's quick tier, one seed). On a clean image the outer ring is nearly a copy of
    the next one, so the repair costs little. Deterministic, so it belongs before :class:`PurifiedDataset`'s cache.

    Args:
        width: how many rings to replace; 1 (the zero-padded ring of a 3x3 kernel) by default.

    Input: float images ``(..., C, H, W)`` in ``[0, 1]``, uint8 tensors, ``tv_tensors.Image`` or PIL images, H
    and W greater than ``2 * width``; the output keeps the input's type, dtype and device.

    Example:
        >>> import torch
        >>> x = torch.full((3, 6, 6), 0.5)
        >>> x[:, 0, :] = 0.2  # a dark top edge
        >>> bool((RepairBorder()(x) == 0.5).all())
        True
    """

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.width = check_int(width, "width")
        if self.width < 1:
            raise ValueError(f"width must be at least 1 (rings of pixels), got {width}.")

    def _apply_batch(self, x: Any, params: dict[str, Any]) -> Any:
        return EF.repair_border(x, width=self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}"
