"""The generic transform check of STYLE.md, applied to every transform of the library."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2


class _ListDataset(Dataset):
    def __init__(self, images: list, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i


def check_transform(
    transform: Callable,
    image: torch.Tensor,
    *,
    deterministic: bool,
    accepts_uint8: bool = True,
    range_01: bool = True,
    atol: float = 1e-5,
) -> None:
    """Check the contract every transform of the library keeps.

    Args:
        transform: the transform under test.
        image: a float ``(3, H, W)`` image in ``[0, 1]``.
        deterministic: the transform has an int seed, so equal inputs give equal outputs.
        accepts_uint8: uint8 tensors and PIL images are accepted (and returned as such).
        range_01: outputs lie in ``[0, 1]``.
    """

    def run(x):
        if not deterministic:
            torch.manual_seed(0)
        return transform(x)

    # type, dtype, device and shape kept; no in-place change; output range.
    inputs = [
        image,
        image.double(),
        image.half(),
        torch.stack([image, image.flip(-1)]),
        torch.stack([image] * 4).view(2, 2, *image.shape),
        tv_tensors.Image(image),
    ]
    if accepts_uint8:
        inputs.append((image * 255).round().to(torch.uint8))
    for x in inputs:
        before = x.clone()
        out = run(x)
        assert type(out) is type(x), (type(out), type(x))
        assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
        assert torch.equal(x, before), "the transform changed its input in place"
        if range_01 and out.is_floating_point():
            assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out.float(), x.float()), "the transform returned its input unchanged"
    if accepts_uint8:
        pil = v2.functional.to_pil_image((image * 255).round().to(torch.uint8))
        out = run(pil)
        assert isinstance(out, PIL.Image.Image) and out.size == pil.size and out.mode == "RGB"

    # Labels and other leaves pass through untouched (identical objects).
    label, name, boxes_like = 3, "cat", torch.tensor([1.0, 2.0])
    out = run((tv_tensors.Image(image), label, name, boxes_like))
    assert out[1] is label and out[2] is name and out[3] is boxes_like
    assert isinstance(out[0], tv_tensors.Image)

    # Pickles (DataLoader workers) and behaves the same after a round trip.
    clone = pickle.loads(pickle.dumps(transform))
    if deterministic:
        assert torch.allclose(clone(image), transform(image), atol=atol)

    # Batched == unbatched: every image's output is the same alone or inside a batch.
    batch = torch.stack([image, image.flip(-1), image.flip(-2)])
    if deterministic:
        together = transform(batch)
        alone = torch.stack([transform(b) for b in batch])
        assert torch.allclose(together, alone, atol=atol), (together - alone).abs().max()
        assert torch.allclose(transform(image), transform(image), atol=atol)

    # Inside v2.Compose, from a PIL image as datasets give it.
    pil = v2.functional.to_pil_image((image * 255).round().to(torch.uint8))
    composed = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), transform])
    out = composed(pil)
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32 and out.shape == image.shape

    # In a DataLoader with worker processes.
    ds = _ListDataset([image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)], transform)
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat([b for b, _ in loader])
    assert got.shape == (4, *image.shape)
    if deterministic:
        expected = torch.stack([transform(ds.images[i]) for i in range(4)])
        assert torch.allclose(got, expected, atol=atol)
