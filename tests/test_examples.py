"""The analysis helpers of ``examples/poison_transfer.py`` (the scripts themselves need CIFAR-10 and hours)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(_EXAMPLES))  # as when the script runs: it imports its sibling poison_residue.py
_PATH = _EXAMPLES / "poison_transfer.py"
_spec = importlib.util.spec_from_file_location("poison_transfer", _PATH)
transfer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transfer)


def test_disjoint_subset_is_balanced_and_avoids_the_excluded():
    labels = torch.arange(200) % 4
    exclude = np.arange(0, 200, 3)
    picked = transfer.disjoint_subset(labels, exclude, 40, seed=1).numpy()
    assert len(picked) == 40 and len(set(picked)) == 40 and (np.diff(picked) > 0).all()
    assert not set(picked) & set(exclude)
    assert np.bincount(labels.numpy()[picked], minlength=4).tolist() == [10] * 4


def test_linear_probe_reads_a_planted_class_pattern_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    noise = torch.randn(400, 3, 4, 4, generator=g)
    patterns = torch.randn(4, 3, 4, 4, generator=g)
    assert transfer.linear_probe(noise + patterns[labels], labels) > 0.95
    assert transfer.linear_probe(noise, labels) < 0.45  # chance is 0.25 on 200 held-out points
