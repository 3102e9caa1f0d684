"""The analysis helpers of ``examples/poison_transfer.py`` (the scripts themselves need CIFAR-10 and hours)."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eclipse_transforms.bench import runner

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


_pack_spec = importlib.util.spec_from_file_location("pack_cifar", _EXAMPLES / "pack_cifar.py")
pack_cifar = importlib.util.module_from_spec(_pack_spec)
_pack_spec.loader.exec_module(pack_cifar)


def test_pack_cifar_round_trip_keeps_the_bench_data_key(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = np.arange(40) % 4, np.arange(8) % 4
    source = tmp_path / "cifar.npz"
    np.savez(source, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    monkeypatch.setitem(runner.TIERS, "quick", dataclasses.replace(runner.TIERS["quick"], subset=20))
    manifest = pack_cifar.pack(str(source), "quick", tmp_path / "pack", max_part_mb=0.02)  # ~20 kB parts
    assert manifest["splits"]["train"]["images"] == 20 and len(manifest["splits"]["train"]["parts"]) > 1
    pack_cifar.unpack(tmp_path / "pack", tmp_path / "unpacked.npz")
    with np.load(tmp_path / "unpacked.npz") as d:
        picked = runner.balanced_subset(torch.from_numpy(y_train), 20, 0).numpy()
        assert np.array_equal(d["x_train"], x_train[picked]) and np.array_equal(d["y_train"], y_train[picked])
        assert np.array_equal(d["x_test"], x_test) and np.array_equal(d["y_test"], y_test)
    here = runner._Run(runner.BenchConfig(data=str(source), tier="quick", progress=False))
    there = runner._Run(runner.BenchConfig(data=str(tmp_path / "unpacked.npz"), tier="quick", subset=0))
    assert here.data_key == there.data_key  # so every cache and cell key matches too
    part = tmp_path / "pack" / manifest["splits"]["test"]["parts"][0]
    with np.load(part) as p:
        codes, offsets = p["codes"].copy(), p["offsets"]
    codes[offsets[1] - 40 : offsets[1] - 20] ^= 1  # damage one image's pixels, keep its container readable
    np.savez(part, codes=codes, offsets=offsets)
    with pytest.raises((ValueError, OSError)):
        pack_cifar.unpack(tmp_path / "pack", tmp_path / "again.npz")
    assert not (tmp_path / "again.npz").exists()
