"""The classifier's last layer refitted on the defender's trusted images, and test accuracy after every epoch.

A poison's shortcut lives in what the network's features pick up and in how the last layer weighs them. The trusted
images carry no shortcut, so a linear head fitted on their features alone can only weigh what also tells their
classes apart (last-layer retraining, as in Kirichenko et al. 2023, "Last Layer Re-Training is Sufficient for
Robustness to Spurious Correlations"). This script trains one bench cell's classifier (a bench defense on a poisoned
set from the bench's cache, given by its file, or on clean data), records the test accuracy after every epoch (is
there an early epoch worth stopping at?) and then refits the head:

    python benchmarks/refit_head.py --data ../shared/data/cifar10/cifar10.npz --tier quick \\
        --defense border-despeckle-jpeg --output refit.json adp=<cache>/poisoned/adp-<key>.safetensors clean

The trusted images are the ones the bench's ``-clean<n>`` rows train on: a class-balanced ``n`` of the defender's
clean set (400 on the quick tier, 2,000 on the standard one). The head is a multinomial logistic regression on the
standardised penultimate features of each image and its mirror image, its L2 weight picked by 5-fold
cross-validation on the trusted images alone; test accuracy averages the logits of each test image and its mirror,
as the bench does. If the defense trains on the same trusted images, the refit sees images the features were fitted
to (the cross-validation is then no guide); ``--held-out`` draws them from the rest of the clean set instead, e.g.
``--defense border-despeckle-jpeg-clean200x10 --trusted 200 --held-out``: 400 trusted images in all, half trained
on, half kept for the refit. The search's candidates (``benchmarks/defense_search.py``) are defenses here too. One
JSON line per poisoned set, all of them in ``--output``. One seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as nnf

from eclipse_transforms.bench import TIERS
from eclipse_transforms.bench.analysis import disjoint_subset
from eclipse_transforms.bench.classifier import evaluate, fit_classifier
from eclipse_transforms.bench.defenses import DefenseContext, get_defense
from eclipse_transforms.bench.runner import append_clean_images, balanced_subset, load_bench_data
from eclipse_transforms.denoiser import bundled_weights_path

L2_GRID = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)


def features(model: torch.nn.Module, images: torch.Tensor, *, flip: bool = False) -> torch.Tensor:
    """The compact CNN's penultimate features (its input to the linear head) of uint8 ``images``."""
    body = model[:-2]  # compact_cnn ends with Linear and a scale
    body.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            x = images[start : start + 1000].float().div_(255).contiguous(memory_format=torch.channels_last)
            out.append(body(x.flip(-1) if flip else x))
    return torch.cat(out)


def fit_head(f: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logistic-regression head on standardised features ``f``; returns ``features -> logits``."""
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    w = torch.zeros(z.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nnf.cross_entropy(z @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda g: ((g - mu) / sd) @ w.detach() + b.detach()


def pick_l2(f: torch.Tensor, f_flip: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[float, float]]:
    """The L2 weight of :data:`L2_GRID` with the best 5-fold cross-validated accuracy on the trusted images."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    folds = (torch.arange(len(y)) % 5)[perm.argsort()]
    scores = {}
    for l2 in L2_GRID:
        hits = 0
        for k in range(5):
            train, held = folds != k, folds == k
            head = fit_head(torch.cat([f[train], f_flip[train]]), torch.cat([y[train], y[train]]), l2)
            hits += ((head(f[held]) + head(f_flip[held])).argmax(1) == y[held]).sum().item()
        scores[l2] = hits / len(y)
    return max(scores, key=scores.get), scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "poisoned", nargs="+", help="bench-cached poisoned sets of the tier (path or label=path), or 'clean'"
    )
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz or torchvision root, as for the bench")
    parser.add_argument("--tier", default="quick", choices=sorted(TIERS))
    parser.add_argument("--defense", default="border-despeckle-jpeg", help="a bench defense (default: the squeeze)")
    parser.add_argument("--trusted", type=int, default=None, help="trusted images (default: 400 quick, else 2,000)")
    parser.add_argument(
        "--held-out", action="store_true", help="refit on trusted images the defense does not train on"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the tier's epochs (a smoke test)")
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import defense_search  # noqa: F401  (registers the search's candidates as defenses; beside this script)
    from poison_residue import load_poisoned

    tier = TIERS[args.tier]
    recipe = tier.recipe if args.epochs is None else dataclasses.replace(tier.recipe, epochs=args.epochs)
    if recipe.model != "compact":
        parser.error(f"the {args.tier} tier trains {recipe.model!r}; this script reads the compact CNN's head only.")
    defense = get_defense(args.defense, DefenseContext(seed=args.seed, progress=False))
    if defense.adversarial_epsilon or defense.worst_of > 1:
        parser.error(f"--defense {args.defense!r} changes the training loop (PGD or worst-of-k); not supported here.")
    sets, _ = load_poisoned([p for p in args.poisoned if p != "clean"])  # the files, before any training
    sparse = bundled_weights_path().parent / "cifar10_sparse_indices.json"  # the bench's defender's clean set
    data = load_bench_data(args.data, tier.subset, args.seed, exclude_test=sparse)
    for label, images in sets.items():
        if images.shape != data.images.shape:
            parser.error(
                f"{label}: {tuple(images.shape)} images, the {args.tier} tier's are {tuple(data.images.shape)}."
            )
    if "clean" in args.poisoned:
        sets["clean"] = data.images
    clean, clean_labels = data.excluded_images, data.excluded_labels
    size = args.trusted or (400 if args.tier == "quick" else 2000)
    trained_on = balanced_subset(clean_labels, defense.clean_images, args.seed) if defense.clean_images else None
    if args.held_out:  # none of the images the defense trains on
        pick = disjoint_subset(clean_labels, np.asarray([] if trained_on is None else trained_on), size, args.seed)
    else:
        pick = balanced_subset(clean_labels, size, args.seed)
    trusted, trusted_labels = clean[pick], clean_labels[pick]
    results = {}
    for label, images in sets.items():
        if defense.prepare is not None:
            images = defense.prepare(images, data.labels)
        labels = data.labels
        if defense.clean_images:  # as the bench does: the trusted images appended, clean_repeat times each
            images, labels = append_clean_images(
                images, labels, clean, clean_labels, defense.clean_images, args.seed, defense.clean_repeat
            )
        curve: list[float] = []

        def on_epoch(epoch: int, model: torch.nn.Module, curve: list[float] = curve) -> None:
            curve.append(round(evaluate(model, data.test_images, data.test_labels, tta=True), 4))
            model.train()

        model, stats = fit_classifier(
            images,
            labels,
            recipe,
            num_classes=10,
            epoch_transform=defense.epoch_transform,
            seed=args.seed,
            progress=False,
            on_epoch=on_epoch,
        )
        f, f_flip = features(model, trusted), features(model, trusted, flip=True)
        l2, scores = pick_l2(f, f_flip, trusted_labels)
        head = fit_head(torch.cat([f, f_flip]), torch.cat([trusted_labels, trusted_labels]), l2)
        logits = head(features(model, data.test_images)) + head(features(model, data.test_images, flip=True))
        results[label] = {
            "defense": args.defense,
            "tier": args.tier,
            "curve": curve,
            "final": curve[-1],
            "refitted_head": round((logits.argmax(1) == data.test_labels).float().mean().item(), 4),
            "l2": l2,
            "cv": scores,
            "trusted_images": len(trusted_labels),
            "held_out": args.held_out,
            "original_head_on_trusted": round(evaluate(model, trusted, trusted_labels, tta=True), 4),
            "train_accuracy": stats["train_accuracy"],
        }
        print(json.dumps({label: results[label]}), flush=True)
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
