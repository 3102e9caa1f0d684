"""Model-based poisons (issue 5): budgets, determinism, resume after interruption, tiny end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch

from eclipse_transforms.bench import em as em_module
from eclipse_transforms.bench.em import EMConfig, em
from eclipse_transforms.bench.poisons import get_poison

TINY = EMConfig(pgd_steps=2, train_batches=2, max_rounds=3, batch_size=16, widths=(8, 8, 8), stop_accuracy=1.1)


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[:4] = 0  # pixels at the range's ends: the clamp must keep x + δ in [0, 1]
    images[4:8] = 255
    return images, torch.arange(40) % 4


def test_em_budget_determinism_and_labels(data, tmp_path):
    images, labels = data
    out = em(images, labels, seed=1, config=TINY, progress=False, work_dir=tmp_path / "a")
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    change = (out.int() - images.int()).abs()
    assert change.max() <= 8 and change.float().mean() > 1  # L∞ 8/255 after rounding, and not a no-op
    assert torch.equal(out, em(images, labels, seed=1, config=TINY, progress=False))
    assert not torch.equal(out, em(images, labels, seed=2, config=TINY, progress=False))
    assert torch.equal(labels, torch.arange(40) % 4)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["rounds"] == 3 and report["converged"] is False and report["config"]["pgd_steps"] == 2
    assert get_poison("em") is em


def test_em_stops_when_the_surrogate_fits(data, tmp_path):
    images, labels = data
    em(
        images,
        labels,
        config=EMConfig(**{**TINY.to_dict(), "stop_accuracy": -1.0, "widths": (8, 8, 8)}),
        progress=False,
        work_dir=tmp_path,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"] == 1 and report["converged"] is True


def test_em_resume_after_interruption_equals_uninterrupted(data, tmp_path, monkeypatch):
    images, labels = data
    expected = em(images, labels, seed=0, config=TINY, progress=False)
    real, calls = em_module._minimise, []

    def crash_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(em_module, "_minimise", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        em(images, labels, seed=0, config=TINY, progress=False, work_dir=tmp_path)
    monkeypatch.setattr(em_module, "_minimise", real)
    resumed = em(images, labels, seed=0, config=TINY, progress=False, work_dir=tmp_path)
    assert torch.equal(resumed, expected)
    # A damaged checkpoint is not trusted: the run starts over and still gives the same poison.
    (tmp_path / "state.pt").write_bytes(b"garbage")
    assert torch.equal(em(images, labels, seed=0, config=TINY, progress=False, work_dir=tmp_path), expected)
