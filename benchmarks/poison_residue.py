"""How much of a poison survives purification, per sampler setting: a quick proxy before the full bench.

For held-out CIFAR-10 test images x and a perturbation δ, with the *same* purification noise for both:
    residue = ||P(x + δ) - P(x)||₂ / ||δ||₂
(0 % = the poison is gone, 100 % = untouched), plus PSNR(P(x + δ), x) and the share of δ's energy below 1/8
cycle/pixel (diffusion noise is white and the denoiser keeps an image's low frequencies, so that share survives).
Perturbations (model-free stand-ins for the real poisons): per-pixel uniform noise (URP-like, L∞ 8/255), 8x8
patch-constant noise (LSP-like, L2 1.30), and ±8/255 sign noise (the L∞ budget of EM/TAP/REM at its most
energetic). ``--poisoned`` measures real poisoned sets from the bench's cache instead
(``<cache>/poisoned/<name>-<key>.safetensors`` of a class-balanced training subset): δ is the poisoned image minus
its clean original, on training images.
Label a file as ``label=path`` to measure two variants of one poison in one run.
``--t-star`` takes several values, to see how much more diffusion noise a poison needs.

    python benchmarks/poison_residue.py --data ../shared/data/cifar10/cifar10.npz
    python benchmarks/poison_residue.py --poisoned ~/.cache/eclipse-transforms/bench/poisoned/rem-*.safetensors \
        --t-star 100,200,300 --steps 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from eclipse_transforms import functional as EF
from eclipse_transforms import load_denoiser
from eclipse_transforms.bench.runner import balanced_subset
from eclipse_transforms.utils import index_generators, load_image_set, quantize

REPO = Path(__file__).resolve().parents[1]


def perturbations(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    uniform = (torch.rand(shape, generator=g) * 2 - 1) * 8 / 255
    patches = torch.randn(n, c, h // 8, w // 8, generator=g).repeat_interleave(8, -2).repeat_interleave(8, -1)
    patches = patches / patches.flatten(1).norm(dim=1).view(n, 1, 1, 1) * (6 / 255) * (c * h * w) ** 0.5
    sign = (torch.randint(0, 2, shape, generator=g) * 2 - 1) * 8 / 255
    return {"uniform Linf 8/255": uniform, "8x8 patches L2 1.30": patches, "sign +-8/255": sign}


def low_frequency_share(delta: torch.Tensor, cutoff: float = 1 / 8) -> float:
    """Share of ``delta``'s energy at spatial frequencies below ``cutoff`` cycles/pixel (white noise: ~5 %)."""
    h, w = delta.shape[-2:]
    radius = torch.fft.fftfreq(h).view(-1, 1).hypot(torch.fft.fftfreq(w).view(1, -1))
    power = torch.fft.fft2(delta).abs().pow(2).mean(dim=tuple(range(delta.dim() - 2)))
    return (power[radius < cutoff].sum() / power.sum()).item()


def load_poisoned(files: list[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``{label: uint8 images}`` of bench-cached poisoned sets given as ``path`` or ``label=path``, and the labels
    of CUDA sets (by the file's poison, whatever the label), which re-blur the whole image."""
    sets: dict[str, torch.Tensor] = {}
    reblurred = set()
    for f in files:
        label, eq, path = f.rpartition("=")
        if not eq or not Path(path).is_file():  # a plain path: named after its poison
            label, path = Path(f).name.split("-")[0], f
        if not Path(path).is_file():
            raise FileNotFoundError(f"--poisoned: {path} does not exist.")
        if label in sets:
            raise ValueError(f"--poisoned: two files named {label!r}; label them, e.g. 'rem-control=<path>'.")
        sets[label] = load_file(path)["images"]
        if Path(path).name.split("-")[0] == "cuda":
            reblurred.add(label)
    return sets, reblurred


def bench_perturbations(
    files: list[str],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    seed: int,
    num: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]:
    """Training-set indices, clean images and ``{poison: poisoned images}`` (floats) of ``num`` images of cached sets.

    The bench caches a poisoned copy of its class-balanced subset (``balanced_subset(labels, n, seed)``); all files
    must cover the same subset, one file per poison. Checked before any purification starts.
    """
    sets, reblurred = load_poisoned(files)
    sizes = {len(v) for v in sets.values()}
    if len(sizes) != 1:
        raise ValueError(f"--poisoned: the files cover different subsets (sizes {sorted(sizes)}); pass one tier's.")
    size = sizes.pop()
    pick = np.sort(rng.choice(size, num, replace=False))
    held = balanced_subset(train_labels, size, seed).numpy()[pick]
    clean = train_images[held].float() / 255
    poisoned = {name: images[pick].float() / 255 for name, images in sets.items()}
    for name, x in poisoned.items():
        gap = (x - clean).abs().mean().item() * 255  # a few levels for a poison, ~60 for unrelated images
        if name not in reblurred and gap > 20:  # CUDA re-blurs the whole image; skip the check
            raise ValueError(f"--poisoned {name}: mean |poisoned - clean| is {gap:.0f}/255; wrong --subset-seed?")
    return held, clean, poisoned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--paper-images", type=int, default=32, help="images for the slow 100-step sampler")
    parser.add_argument("--t-star", default="100", help="comma-separated diffusion timesteps (default: 100)")
    parser.add_argument("--steps", default="1,2,4,10,paper")
    parser.add_argument(
        "--poisoned",
        nargs="+",
        default=None,
        help="bench-cached poisoned sets (.safetensors), each a path or label=path (two variants of one poison)",
    )
    parser.add_argument("--subset-seed", type=int, default=0, help="the bench's --seed that drew their subset")
    args = parser.parse_args()
    t_stars = [int(t) for t in args.t_star.split(",")]
    den = load_denoiser(args.weights)
    rng = np.random.default_rng(2)
    if args.poisoned:
        train = load_image_set(args.data, split="train")
        held, clean, poisoned_sets = bench_perturbations(
            args.poisoned, train.images, train.labels, args.subset_seed, args.num_images, rng
        )
    else:
        test = load_image_set(args.data, split="test")
        sparse = json.loads((REPO / "weights" / "cifar10_sparse_indices.json").read_text())["indices"]
        held = np.sort(rng.choice(np.setdiff1d(np.arange(len(test.images)), sparse), args.num_images, replace=False))
        clean = test.images[held].float() / 255
        poisoned_sets = {
            name: quantize((clean + delta).clamp(0, 1)).float() / 255
            for name, delta in perturbations(tuple(clean.shape)).items()
        }
    width = max(22, *(len(name) for name in poisoned_sets))
    print(
        f"{'perturbation':<{width}} {'low-freq':>8} {'t*':>4} {'setting':<8} {'residue':>8} {'PSNR vs clean':>14} "
        f"{'images':>7} {'s':>4}"
    )
    for name, poisoned in poisoned_sets.items():
        delta = poisoned - clean
        low = 100 * low_frequency_share(delta)
        for t_star in t_stars:
            for spec in args.steps.split(","):
                steps = None if spec == "paper" else int(spec)
                n = args.paper_images if steps is None else len(clean)
                gens = lambda n=n: index_generators(held[:n].tolist(), 0)  # noqa: E731
                t0 = time.perf_counter()
                a = EF.purify(poisoned[:n], den, t_star, steps=steps, generator=gens())
                b = EF.purify(clean[:n], den, t_star, steps=steps, generator=gens())
                seconds = time.perf_counter() - t0
                d = delta[:n].flatten(1).norm(dim=1)
                residue = ((a - b).flatten(1).norm(dim=1) / d).mean().item()
                mse = (quantize(a).float() / 255 - clean[:n]).pow(2).flatten(1).mean(1)
                psnr = (10 * torch.log10(1 / mse)).mean().item()
                row = f"{name:<{width}} {low:>7.1f}% {t_star:>4} {spec:<8} {100 * residue:>7.1f}% {psnr:>11.2f} dB"
                print(f"{row} {n:>7} {seconds:>4.0f}", flush=True)


if __name__ == "__main__":
    main()
