"""Which of CUDA's class cues survive a squeeze: linear probes on the interior's spectrum and on the border.

CUDA (Sadasivan et al., CVPR 2023) convolves every image of a class with that class's random 3x3 kernel over
zero padding. That leaves two cues a classifier can read the class from: the interior's class-wise blur (its
amplitude spectrum) and the class-wise darkening of the outermost pixel ring (the zero padding). This script
measures how much of each survives a squeeze, as the held-out accuracy of a linear probe (logistic regression,
L-BFGS) trained on one feature set of the quick tier's class-balanced 10,000 images (8,000 to fit, 2,000 to
score; chance 10 %), on clean and on CUDA-poisoned images alike:

- ``spectrum``: the log-amplitude spectrum (rfft2, channels averaged) of the interior 26x26 crop, mean removed;
- ``border``: 12 log brightness ratios, outer ring / next ring, per side and channel.

    python benchmarks/cuda_cues.py --data ../shared/data/cifar10/cifar10.npz

The defense search (benchmarks/results/defense-search/README.md) found that JPEG q20 and the border repair each
do nothing against CUDA alone and lift it together; this is the measurement of why.
"""

from __future__ import annotations

import argparse
import platform

import torch

from eclipse_transforms import Despeckle, RepairBorder
from eclipse_transforms.bench.defenses import jpeg
from eclipse_transforms.bench.poisons import get_poison
from eclipse_transforms.bench.runner import TIERS, load_bench_data


def spectrum_features(x: torch.Tensor, crop: int = 3) -> torch.Tensor:
    """Log-amplitude spectrum of the interior of uint8 ``(N, 3, H, W)`` images (channels averaged), flattened."""
    z = x.float()[..., crop:-crop, crop:-crop] / 255
    z = z - z.mean((-2, -1), keepdim=True)
    return torch.fft.rfft2(z).abs().add(1e-3).log().mean(1).flatten(1)


def border_features(x: torch.Tensor) -> torch.Tensor:
    """Log of the outer ring's brightness over the next ring's, per side (corners left out) and channel."""
    z = x.float() + 1
    sides = [
        (z[..., 0, 1:-1], z[..., 1, 1:-1]),
        (z[..., -1, 1:-1], z[..., -2, 1:-1]),
        (z[..., 1:-1, 0], z[..., 1:-1, 1]),
        (z[..., 1:-1, -1], z[..., 1:-1, -2]),
    ]
    return torch.cat([(outer.mean(-1) / inner.mean(-1)).log() for outer, inner in sides], 1)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, fit: int, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a logistic regression fitted on the first ``fit`` rows (standardised on them)."""
    mean, std = features[:fit].mean(0), features[:fit].std(0).clamp_min(1e-6)
    f = (features - mean) / std
    classes = int(labels.max()) + 1
    w = torch.zeros(f.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(f[:fit] @ w + b, labels[:fit]) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((f[fit:] @ w + b).argmax(1) == labels[fit:]).float().mean().item()


SQUEEZES = {
    "none": lambda x: x,
    "jpeg-q20": lambda x: jpeg(x, 20),
    "repair-border": RepairBorder(),
    "repair-border, jpeg-q20": lambda x: jpeg(RepairBorder()(x), 20),
    "despeckle 32/255, jpeg-q20": lambda x: jpeg(Despeckle(32 / 255)(x), 20),
    "despeckle 64/255, jpeg-q20": lambda x: jpeg(Despeckle(64 / 255)(x), 20),
    "repair-border, despeckle 64/255, jpeg-q20": lambda x: jpeg(Despeckle(64 / 255)(RepairBorder()(x)), 20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 (.npz, torchvision root or ImageFolder)")
    parser.add_argument("--seed", type=int, default=0, help="the bench's seed: subset and CUDA kernels")
    parser.add_argument("--fit", type=int, default=8000, help="images the probes are fitted on; the rest score")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_bench_data(args.data, TIERS["quick"].subset, args.seed)
    images, labels = data.images, data.labels
    poisoned = get_poison("cuda")(images, labels, seed=args.seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))  # mix the classes
    images, labels, poisoned = images[order], labels[order], poisoned[order]
    print(f"# {len(labels)} images (quick tier, seed {args.seed}), probes fitted on {args.fit}; {platform.machine()}")
    print("| squeeze | spectrum, clean | spectrum, CUDA | border, clean | border, CUDA |")
    print("|---|---|---|---|---|")
    for name, squeeze in SQUEEZES.items():
        clean, cuda = squeeze(images), squeeze(poisoned)
        cells = [
            probe_accuracy(spectrum_features(clean), labels, args.fit),
            probe_accuracy(spectrum_features(cuda), labels, args.fit),
            probe_accuracy(border_features(clean), labels, args.fit),
            probe_accuracy(border_features(cuda), labels, args.fit),
        ]
        print(f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
