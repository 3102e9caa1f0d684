"""Small analyses of poisoned sets that scripts share: class-balanced subsets that avoid given indices, and a
linear probe that says whether a set of images (or of perturbations) carries a linearly readable class signal.

    >>> labels = torch.arange(12) % 3
    >>> disjoint_subset(labels, np.array([0, 1, 2]), 6, seed=0).tolist()  # two per class, none of 0, 1, 2
    [4, 5, 6, 9, 10, 11]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf

__all__ = ["disjoint_subset", "linear_probe"]


def disjoint_subset(labels: torch.Tensor, exclude: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``size / num_classes`` images per class, none of them in ``exclude``."""
    y = labels.numpy()
    free = np.setdiff1d(np.arange(len(y)), exclude)
    rng = np.random.default_rng(seed)
    per_class = size // (int(y.max()) + 1)
    picks = [rng.choice(free[y[free] == c], per_class, replace=False) for c in range(int(y.max()) + 1)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def linear_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on standardised, flattened ``features`` (half train, half test)."""
    x = features.flatten(1).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[: len(x) // 2], order[len(x) // 2 :]
    w = torch.zeros(x.shape[1], int(labels.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-3)
    for _ in range(steps):
        loss = nnf.cross_entropy(x[train] @ w + b, labels[train]) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[test] @ w + b).argmax(1) == labels[test]).float().mean().item()
