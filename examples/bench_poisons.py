"""Benchmark: how long each model-free poison takes on N CIFAR-sized images on this machine (not a test).

python examples/bench_poisons.py --num-images 50000
"""

from __future__ import annotations

import argparse
import time

import torch

from eclipse_transforms.bench.poisons import get_poison, list_poisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(args.num_images) % 10
    for name in list_poisons():
        t0 = time.perf_counter()
        out = get_poison(name)(images, labels, seed=0)
        seconds = time.perf_counter() - t0
        delta = (out.float() - images.float()) / 255
        print(
            f"{name:<5} {seconds:7.2f} s  ({args.num_images / seconds:9.0f} images/s)  "
            f"L-inf {delta.abs().max():.4f}  mean L2 {delta.flatten(1).norm(dim=1).mean():.3f}  "
            f"mean L0 {(delta != 0).any(1).flatten(1).sum(1).float().mean():.0f} px",
            flush=True,
        )


if __name__ == "__main__":
    main()
