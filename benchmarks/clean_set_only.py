"""The floor every defense must clear: a classifier trained on the defender's own clean images alone.

ECLIPSE's defender holds a small clean set (the sparse set its denoiser is trained on: 2,000 CIFAR-10 test images,
200 per class, which the bench leaves out of its test set). Whatever a defense makes of the poisoned training
set, training on those clean images alone and discarding the rest is always possible; a defense that scores below
this is worse than throwing the scraped data away.

    python benchmarks/clean_set_only.py --data ../shared/data/cifar10/cifar10.npz --epochs 15 75

trains the bench's classifier recipe (the tier's: compact CNN, crop and flip, seed 0) on the clean set, once per
``--epochs`` value, and prints one JSON line each: the test accuracy on the bench's test images (the test split
without the clean set). ``--images`` takes a class-balanced part of the clean set (400: the quick subset's 4 %, the
standard tier's 2,000 of 50,000). Each epoch is a pass over the clean set only: 75 epochs of 2,000 images are as
many training images as the quick tier's 15 of 10,000. One seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from eclipse_transforms.bench import TIERS, train_classifier
from eclipse_transforms.bench.runner import balanced_subset, load_bench_data
from eclipse_transforms.denoiser import bundled_weights_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz or torchvision root, as for the bench")
    parser.add_argument("--tier", default="quick", choices=sorted(TIERS), help="whose classifier recipe to train")
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=None, help="passes over the clean set (default: the tier's)"
    )
    parser.add_argument("--images", type=int, default=None, help="class-balanced part of the clean set (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipe = TIERS[args.tier].recipe
    for epochs in args.epochs or [recipe.epochs]:
        if epochs < 1:
            parser.error(f"--epochs must be >= 1; got {epochs}.")
    sparse = bundled_weights_path().parent / "cifar10_sparse_indices.json"
    data = load_bench_data(args.data, 10, args.seed, exclude_test=sparse)  # the training split is not used
    images, labels = data.excluded_images, data.excluded_labels
    if args.images is not None:
        if not 1 <= args.images <= len(labels):
            parser.error(f"--images must be in [1, {len(labels)}] (the clean set's size); got {args.images}.")
        pick = balanced_subset(labels, args.images, args.seed)
        images, labels = images[pick], labels[pick]
    for epochs in args.epochs or [recipe.epochs]:
        result = train_classifier(
            images,
            labels,
            data.test_images,
            data.test_labels,
            dataclasses.replace(recipe, epochs=epochs),
            seed=args.seed,
            progress=False,
        )
        print(
            json.dumps(
                {
                    "tier": args.tier,
                    "clean_images": len(labels),
                    "epochs": epochs,
                    "seed": args.seed,
                    "test_images": len(data.test_labels),
                    "test_accuracy": round(result["test_accuracy"], 4),
                    "train_seconds": round(result["train_seconds"], 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
