"""Does a poison carry class features that a *clean* network reads, before and after purification?

Error-minimising noise crafted against one fixed network may be a class feature any CIFAR-10 classifier reads
(it makes images *easier*), while noise that co-adapted with its own surrogate (EM's min-min) may be a shortcut
only once learned. This script tests that on the bench's cached poisoned sets: it trains a reference classifier
(the quick tier's recipe) on 10,000 clean training images *disjoint* from the bench's subset, then reports its
accuracy and mean true-class probability on each poisoned subset x + δ against the clean x, and, with
``--cache-dir``, on the purified copies P(x + δ) against P(x) that the bench cached (same noise for both).

    python benchmarks/poison_transfer.py --cache-dir .devdata/bench-cache \
        --poisoned em=<cache>/poisoned/em-<key>.safetensors sep=<cache>/poisoned/sep-<key>.safetensors

A poison with +Δ accuracy on x + δ hands a clean model the label; if P(x + δ) keeps part of that gain, what
survives purification is still a class feature, which the compensation's grayscale and noise do not target.

A second test asks whether the perturbation is a *shortcut* by itself, as Yu et al. ("Availability attacks
create shortcuts") found for EM, REM and TAP: a linear probe (multinomial logistic regression, trained on half
the images, accuracy on the other half) reads the label from δ alone and, with ``--cache-dir``, from what
purification leaves of it, r = P(x + δ) - P(x). Chance is 10 %.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from poison_residue import load_poisoned  # benchmarks/, beside this script
from safetensors.torch import load_file, save_file

from eclipse_transforms.bench.analysis import disjoint_subset, linear_probe
from eclipse_transforms.bench.classifier import Recipe, fit_classifier
from eclipse_transforms.bench.defenses import DefenseContext, purified
from eclipse_transforms.bench.models import build_model
from eclipse_transforms.bench.runner import balanced_subset
from eclipse_transforms.dataset import default_cache_dir
from eclipse_transforms.purify import DEFAULT_STEPS
from eclipse_transforms.utils import load_image_set

REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean softmax probability of the true class (no test-time augmentation)."""
    model.eval()
    hits, prob = 0.0, 0.0
    for start in range(0, len(images), 1000):
        x = images[start : start + 1000].float().div(255).contiguous(memory_format=torch.channels_last)
        y = labels[start : start + 1000]
        p = model(x).softmax(1)
        hits += (p.argmax(1) == y).sum().item()
        prob += p.gather(1, y[:, None]).sum().item()
    return hits / len(images), prob / len(images)


def reference_model(path: Path, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """The quick recipe's classifier trained on ``images`` (loaded from ``path`` when it was trained before)."""
    recipe = Recipe()
    model = build_model(recipe.model, recipe.widths, 10)
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model
    model, stats = fit_classifier(images, labels, recipe, seed=seed, desc="reference")
    print(
        f"reference classifier trained in {stats['train_seconds']:.0f} s (train accuracy {stats['train_accuracy']:.3f})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))
    parser.add_argument("--poisoned", nargs="+", required=True, help="bench-cached poisoned sets, label=path or path")
    parser.add_argument("--cache-dir", default=None, help="the bench's --cache-dir: also score its purified copies")
    parser.add_argument("--subset-seed", type=int, default=0, help="the bench's --seed that drew its subset")
    parser.add_argument(
        "--reference",
        default=str(default_cache_dir() / "poison_transfer_reference.safetensors"),
        help="where the reference classifier is kept (trained on first use: 10 min at one thread beside two other jobs)",
    )
    args = parser.parse_args()
    train = load_image_set(args.data, split="train")
    sets, _ = load_poisoned(args.poisoned)
    sizes = {len(v) for v in sets.values()}
    if len(sizes) != 1:
        raise ValueError(f"--poisoned: the files cover different subsets (sizes {sorted(sizes)}); pass one tier's.")
    subset = balanced_subset(train.labels, sizes.pop(), args.subset_seed)
    clean, labels = train.images[subset], train.labels[subset]
    ref = disjoint_subset(train.labels, subset.numpy(), 10_000, seed=1)
    model = reference_model(Path(args.reference), train.images[ref], train.labels[ref], seed=1)

    context = DefenseContext(cache_dir=str(Path(args.cache_dir) / "purified")) if args.cache_dir else None
    print(f"linear probe on the clean images themselves: {100 * linear_probe(clean, labels):.1f} %")
    head = f"{'set':<16} {'acc x':>7} {'p(y) x':>7} {'probe δ':>8}"
    print(head + (f" {'acc P(x)':>9} {'p(y) P(x)':>10} {'probe r':>8}" if context else ""))
    clean_purified = purified(clean, labels, context, DEFAULT_STEPS) if context else None
    for name, images in {"clean": clean, **sets}.items():
        acc, prob = scores(model, images, labels)
        delta = images.float() - clean.float()
        line = f"{name:<16} {100 * acc:>6.1f}% {prob:>7.3f} "
        line += f"{100 * linear_probe(delta, labels):>7.1f}%" if name != "clean" else f"{'-':>8}"
        if context:
            after = clean_purified if name == "clean" else purified(images, labels, context, DEFAULT_STEPS)
            pacc, pprob = scores(model, after, labels)
            line += f" {100 * pacc:>8.1f}% {pprob:>10.3f} "
            residue = after.float() - clean_purified.float()
            line += f"{100 * linear_probe(residue, labels):>7.1f}%" if name != "clean" else f"{'-':>8}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
