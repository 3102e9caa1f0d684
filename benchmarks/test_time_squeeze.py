"""Should the test images go through the defense's one-time stages too? Train one bench cell's classifier, then test
it on the clean test images (the bench's protocol), on the test images through the defense's ``prepare`` (the
squeeze), and on both (softmax averaged).

A defense that removes detail from the training images (JPEG) trains the network on images unlike the clean ones it
is tested on. If that mismatch were the clean-data cost, squeezing the test images too would give it back.

    python benchmarks/test_time_squeeze.py --data ../shared/data/cifar10/cifar10.npz --cache-dir .devdata/bench-cache

prints one JSON line. Same subset, recipe, seed, test set and epoch transform as the bench's cell (its clean-test
accuracy reproduces the cell's), one seed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eclipse_transforms.bench import get_defense
from eclipse_transforms.bench.classifier import fit_classifier
from eclipse_transforms.bench.runner import BenchConfig, _Run  # the bench's own data, subset and test split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz or torchvision root, as for the bench")
    parser.add_argument("--cache-dir", default=None, help="the bench's cache (poisoned sets)")
    parser.add_argument("--tier", default="quick")
    parser.add_argument("--poison", default="clean", help="'clean' or a bench poison spec (crafted if not cached)")
    parser.add_argument("--defense", default="border-despeckle-jpeg")
    args = parser.parse_args(argv)
    poisons = "urp" if args.poison == "clean" else args.poison  # the config needs one; only `poisoned` reads it
    config = BenchConfig(
        data=args.data,
        cache_dir=args.cache_dir,
        tier=args.tier,
        poisons=poisons,
        defenses=args.defense,
        output_dir="unused",
        progress=False,
    )
    run = _Run(config)
    defense = get_defense(args.defense, run.context)
    if defense.prepare is None:
        parser.error(f"--defense {args.defense} has no one-time stage to apply to the test images.")
    images = run.images if args.poison == "clean" else run.poisoned(args.poison)[0]
    model, _ = fit_classifier(
        defense.prepare(images, run.labels),
        run.labels,
        run.recipe,
        num_classes=10,
        epoch_transform=defense.epoch_transform,
        seed=config.seed,
        progress=False,
    )
    model.eval()

    @torch.no_grad()
    def probabilities(x: torch.Tensor) -> torch.Tensor:  # the bench's test: logits summed with the flipped image
        x = x.float().div(255).contiguous(memory_format=torch.channels_last)
        return torch.cat([(model(b) + model(b.flip(-1))).softmax(1) for b in x.split(1000)])

    clean = probabilities(run.test_images)
    squeezed = probabilities(defense.prepare(run.test_images, run.test_labels))

    def accuracy(p: torch.Tensor) -> float:
        return round((p.argmax(1) == run.test_labels).float().mean().item(), 4)

    result = {
        "tier": args.tier,
        "poison": args.poison,
        "defense": args.defense,
        "seed": config.seed,
        "clean_test": accuracy(clean),
        "squeezed_test": accuracy(squeezed),
        "both": accuracy(clean + squeezed),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
