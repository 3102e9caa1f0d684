"""How much of a poison survives purification, per sampler setting: a quick proxy before the full bench.

For held-out CIFAR-10 test images x and a perturbation δ, with the *same* purification noise for both:
    residue = ||P(x + δ) - P(x)||₂ / ||δ||₂
(0 % = the poison is gone, 100 % = untouched), plus PSNR(P(x + δ), x). Perturbations (model-free stand-ins for
the real poisons, which the bench will generate): per-pixel uniform noise (URP-like, L∞ 8/255), 8x8 patch-constant
noise (LSP-like, L2 1.30), and ±8/255 sign noise (the L∞ budget of EM/TAP/REM at its most energetic).

    python examples/poison_residue.py --data ../shared/data/cifar10/cifar10.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from eclipse_transforms import functional as EF
from eclipse_transforms import load_denoiser
from eclipse_transforms._data import load_image_set
from eclipse_transforms._images import index_generators, quantize

REPO = Path(__file__).resolve().parents[1]


def perturbations(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    uniform = (torch.rand(shape, generator=g) * 2 - 1) * 8 / 255
    patches = torch.randn(n, c, h // 8, w // 8, generator=g).repeat_interleave(8, -2).repeat_interleave(8, -1)
    patches = patches / patches.flatten(1).norm(dim=1).view(n, 1, 1, 1) * (6 / 255) * (c * h * w) ** 0.5
    sign = (torch.randint(0, 2, shape, generator=g) * 2 - 1) * 8 / 255
    return {"uniform Linf 8/255": uniform, "8x8 patches L2 1.30": patches, "sign +-8/255": sign}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--paper-images", type=int, default=32, help="images for the slow 100-step sampler")
    parser.add_argument("--t-star", type=int, default=100)
    parser.add_argument("--steps", default="1,2,4,10,paper")
    args = parser.parse_args()
    den = load_denoiser(args.weights)
    test = load_image_set(args.data, split="test")
    sparse = json.loads((REPO / "weights" / "cifar10_sparse_indices.json").read_text())["indices"]
    rest = np.setdiff1d(np.arange(len(test.images)), sparse)
    held = np.sort(np.random.default_rng(2).choice(rest, args.num_images, replace=False))
    clean = test.images[held].float() / 255
    print(f"{'perturbation':<22} {'setting':<10} {'residue':>8} {'PSNR vs clean':>14} {'images':>7} {'s':>6}")
    for name, delta in perturbations(tuple(clean.shape)).items():
        poisoned = quantize((clean + delta).clamp(0, 1)).float() / 255
        for spec in args.steps.split(","):
            steps = None if spec == "paper" else int(spec)
            n = args.paper_images if steps is None else len(clean)
            gens = lambda n=n: index_generators(held[:n].tolist(), 0)  # noqa: E731
            t0 = time.perf_counter()
            a = EF.purify(poisoned[:n], den, args.t_star, steps=steps, generator=gens())
            b = EF.purify(clean[:n], den, args.t_star, steps=steps, generator=gens())
            seconds = time.perf_counter() - t0
            d = (poisoned[:n] - clean[:n]).flatten(1).norm(dim=1)
            residue = ((a - b).flatten(1).norm(dim=1) / d).mean().item()
            mse = (quantize(a).float() / 255 - clean[:n]).pow(2).flatten(1).mean(1)
            psnr = (10 * torch.log10(1 / mse)).mean().item()
            print(f"{name:<22} {spec:<10} {100 * residue:>7.1f}% {psnr:>11.2f} dB {n:>7} {seconds:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
