"""The README's first command: purify poisoned images and show how much of the poison survives.

Without data, it generates simple scenes (sky, ground, a few shapes) so it runs on a fresh machine offline.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F
from torchvision.utils import make_grid

from ._data import load_image_set
from ._images import check_int, index_generators
from .purify import EclipsePurify, recipe_settings

__all__ = ["generated_images", "run_demo"]


def generated_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` float images ``(n, 3, size, size)`` in ``[0, 1]``: a sky gradient, ground and a few blurred shapes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        top, bottom, ground = (torch.rand(3, 1, 1, generator=g) for _ in range(3))
        img = top + (bottom - top) * yy
        horizon = 0.5 + 0.3 * torch.rand((), generator=g)
        img = torch.where(yy > horizon + 0.05 * torch.sin(6 * xx), ground * (0.7 + 0.3 * yy), img)
        for _ in range(int(torch.randint(2, 5, (), generator=g))):
            cy, cx, ry, rx = torch.rand(4, generator=g) * torch.tensor([1, 1, 0.25, 0.25]) + torch.tensor(
                [0, 0, 0.08, 0.08]
            )
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img = torch.where(mask, torch.rand(3, 1, 1, generator=g), img)
        images.append(img)
    x = torch.stack(images)
    return F.gaussian_blur(x, [3, 3], [0.6, 0.6]).clamp(0, 1)


def _settings(purify: EclipsePurify) -> str:
    """What the demo ran, in a line: the recipe, and the diffusion's settings where it runs one."""
    if not purify.diffusion:
        return f"recipe={purify.recipe}, prefilter={' -> '.join(map(repr, _stages(purify.prefilter)))}, no diffusion"
    dtype = purify.denoiser.dtype
    return (
        f"recipe={purify.recipe}, t_star={purify.t_star}, steps={purify.steps or purify.t_star}, "
        f"weights={purify.denoiser.source}"
        + ("" if dtype == torch.float32 else f", dtype={str(dtype).removeprefix('torch.')}")
    )


def _stages(prefilter: Any) -> list[Any]:
    return list(getattr(prefilter, "transforms", [prefilter] if prefilter is not None else []))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def _check_out(out: str | os.PathLike) -> Path:
    """``out`` as a path Pillow can write an image to, or an error that says what to pass."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"out={str(out)!r} is a folder; pass a file name in it, e.g. {str(path / 'demo.png')!r}.")
    kind = PIL.Image.registered_extensions().get(path.suffix.lower())
    if kind is None or kind not in PIL.Image.SAVE:
        raise ValueError(
            f"out={str(out)!r} does not end in an image format Pillow writes ({path.suffix or 'no extension'}); "
            "name a .png file (or .jpg, .webp, ...)."
        )
    return path


def run_demo(
    purify: EclipsePurify,
    *,
    out: str | os.PathLike = "eclipse-demo.png",
    data: str | os.PathLike | None = None,
    num_images: int = 8,
    epsilon: float = 8 / 255,
) -> dict[str, str]:
    """Poison images with class-wise random noise (L∞ ``epsilon``), purify them, and report what survives.

    Returns the printed summary: PSNRs, the poison's L2 energy, the L2 of the poison's residue after purification
    (``purify(poisoned) - purify(clean)`` with the same noise), the share of the poison's pattern in that residue
    (its projection on the poison), throughput, and where the grid went.
    """
    num_images = check_int(num_images, "num_images", minimum=1)
    path = _check_out(out)  # before the purification: a bad name fails at once
    den = purify.denoiser
    size = 32 if den is None or den.unet.config.sample_size is None else int(den.unet.config.sample_size)
    if data is None:
        clean = generated_images(num_images, size)
        source = "generated scenes"
    else:
        clean = load_image_set(data, split="test").images[:num_images].float() / 255
        source = str(data)
    g = torch.Generator().manual_seed(1)
    # URP-style poison: one uniform random sign pattern per "class" (two classes, alternating images).
    patterns = (torch.randint(0, 2, (2, *clean.shape[1:]), generator=g) * 2 - 1) * epsilon
    poisoned = (clean + patterns[torch.arange(len(clean)) % 2]).clamp(0, 1)
    poisoned = poisoned.mul(255).round().div(255)  # stored as uint8, as a real poisoned dataset is

    gens = lambda: index_generators(range(len(clean)), purify.seed or 0)  # noqa: E731
    # The clean pass comes first and warms the UNet up (first calls allocate and pick kernels), so the timed
    # pass measures what a long build sees per batch of this size.
    purified_clean = purify.purify_batch(clean, gens()).cpu()
    t0 = time.perf_counter()
    purified = purify.purify_batch(poisoned, gens()).cpu()
    seconds = time.perf_counter() - t0
    compensation = (
        recipe_settings(purify.recipe)["compensation"] if purify.compensation is None else purify.compensation
    )
    compensated = compensation.compensate(purified, generator=torch.Generator().manual_seed(2))

    rows = [
        clean,
        poisoned,
        (0.5 + (poisoned - clean) * 255 / 16 / 2).clamp(0, 1),
        purified,
        (0.5 + (purified - purified_clean) * 255 / 16 / 2).clamp(0, 1),
        compensated,
    ]
    grid = make_grid(nnf.interpolate(torch.cat(rows), scale_factor=4, mode="nearest"), nrow=len(clean), padding=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    F.to_pil_image(grid).save(path)

    device = den.device if purify.diffusion else clean.device  # where purify_batch ran
    poison_l2 = (poisoned - clean).flatten(1).norm(dim=1).mean().item()
    residue = (purified - purified_clean).flatten(1)
    residue_l2 = residue.norm(dim=1).mean().item()
    # The share of the poison's pattern still in the residue (its projection on the poison): JPEG changes a
    # poisoned image's blocks in ways that have nothing to do with the poison, which the residue's L2 counts too.
    delta = (poisoned - clean).flatten(1)
    kept = ((residue * delta).sum(1) / delta.pow(2).sum(1).clamp_min(1e-12)).mean().item()
    return {
        "images": f"{len(clean)} x {tuple(clean.shape[1:])} from {source}",
        "settings": _settings(purify),
        "PSNR poisoned vs clean": f"{_psnr(poisoned, clean):.2f} dB",
        "PSNR purified vs clean": f"{_psnr(purified, clean):.2f} dB",
        "poison L2 per image": f"{poison_l2:.3f}",
        "poison residue L2 after purification": f"{residue_l2:.3f} ({100 * residue_l2 / poison_l2:.1f}% of the poison's)",
        "poison pattern kept (the residue projected on the poison)": f"{100 * kept:.1f}%",
        "purification speed": f"{len(clean) / seconds:.1f} images/s on {device} (one warm batch of "
        f"{len(clean)}; larger batches are faster, see benchmarks/bench_throughput.py)",
        "grid (rows: clean, poisoned, poison x16, purified, residue x16, compensated)": str(path),
    }
