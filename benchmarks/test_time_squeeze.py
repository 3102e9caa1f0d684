"""Should the test images go through the defense's one-time stages too? Train one bench cell's classifier, then test
it on the clean test images (the bench's protocol), on the test images through the defense's ``prepare`` (the
squeeze), and on both (softmax averaged).

A defense that removes detail from the training images (JPEG) trains the network on images unlike the clean ones it
is tested on. If that mismatch were the clean-data cost, squeezing the test images too would give it back.

    python benchmarks/test_time_squeeze.py --data ../shared/data/cifar10/cifar10.npz

prints one JSON line. Clean training data, with the bench's subset, recipe, seed, test set (without the bundled
denoiser's sparse set) and epoch transform: at one torch thread (``OMP_NUM_THREADS=1``, as the bench's cells ran)
its clean-test accuracy reproduces the bench's clean cell. One seed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eclipse_transforms.bench import TIERS, get_defense
from eclipse_transforms.bench.classifier import fit_classifier
from eclipse_transforms.bench.runner import load_bench_data
from eclipse_transforms.denoiser import bundled_weights_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz or torchvision root, as for the bench")
    parser.add_argument("--tier", default="quick", choices=sorted(TIERS))
    parser.add_argument("--defense", default="border-despeckle-jpeg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # the bench's data: the tier's class-balanced subset, the test set without the denoiser's sparse set
    sparse = bundled_weights_path().parent / "cifar10_sparse_indices.json"
    data = load_bench_data(args.data, TIERS[args.tier].subset or None, args.seed, exclude_test=sparse)
    images, labels, test_images, test_labels = data.images, data.labels, data.test_images, data.test_labels

    defense = get_defense(args.defense)
    if defense.prepare is None:
        parser.error(f"--defense {args.defense} has no one-time stage to apply to the test images.")
    model, _ = fit_classifier(
        defense.prepare(images, labels),
        labels,
        TIERS[args.tier].recipe,
        num_classes=10,
        epoch_transform=defense.epoch_transform,
        seed=args.seed,
        progress=False,
    )
    model.eval()

    @torch.no_grad()
    def probabilities(x: torch.Tensor) -> torch.Tensor:  # the bench's test: logits summed with the flipped image
        x = x.float().div(255).contiguous(memory_format=torch.channels_last)
        return torch.cat([(model(b) + model(b.flip(-1))).softmax(1) for b in x.split(1000)])

    clean = probabilities(test_images)
    squeezed = probabilities(defense.prepare(test_images, test_labels))

    def accuracy(p: torch.Tensor) -> float:
        return round((p.argmax(1) == test_labels).float().mean().item(), 4)

    result = {
        "tier": args.tier,
        "defense": args.defense,
        "seed": args.seed,
        "test_images": len(test_labels),
        "clean_test": accuracy(clean),
        "squeezed_test": accuracy(squeezed),
        "both": accuracy(clean + squeezed),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
