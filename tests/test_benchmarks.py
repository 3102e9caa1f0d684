"""The analysis helpers the benchmark scripts share, and ``benchmarks/pack_cifar.py`` run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eclipse_transforms.bench import runner
from eclipse_transforms.bench.analysis import disjoint_subset, linear_probe

PACK = Path(__file__).resolve().parents[1] / "benchmarks" / "pack_cifar.py"


def test_disjoint_subset_is_balanced_and_avoids_the_excluded():
    labels = torch.arange(200) % 4
    exclude = np.arange(0, 200, 3)
    picked = disjoint_subset(labels, exclude, 40, seed=1).numpy()
    assert len(picked) == 40 and len(set(picked)) == 40 and (np.diff(picked) > 0).all()
    assert not set(picked) & set(exclude)
    assert np.bincount(labels.numpy()[picked], minlength=4).tolist() == [10] * 4


def test_linear_probe_reads_a_planted_class_pattern_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    noise = torch.randn(400, 3, 4, 4, generator=g)
    patterns = torch.randn(4, 3, 4, 4, generator=g)
    assert linear_probe(noise + patterns[labels], labels) > 0.95
    assert linear_probe(noise, labels) < 0.45  # chance is 0.25 on 200 held-out points


def _pack_cifar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PACK), *args], capture_output=True, text=True)


def test_pack_cifar_round_trip_keeps_the_bench_data_key(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = np.arange(40) % 4, np.arange(8) % 4
    source = tmp_path / "cifar.npz"
    np.savez(source, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    pack = tmp_path / "pack"
    done = _pack_cifar("pack", "--data", str(source), "--subset", "20", "--max-part-mb", "0.02", "--out", str(pack))
    assert done.returncode == 0, done.stderr
    assert len(list(pack.glob("train-*.npz"))) > 1  # ~20 kB parts
    assert _pack_cifar("unpack", str(pack), "--out", str(tmp_path / "unpacked.npz")).returncode == 0
    with np.load(tmp_path / "unpacked.npz") as d:
        picked = runner.balanced_subset(torch.from_numpy(y_train), 20, 0).numpy()
        assert np.array_equal(d["x_train"], x_train[picked]) and np.array_equal(d["y_train"], y_train[picked])
        assert np.array_equal(d["x_test"], x_test) and np.array_equal(d["y_test"], y_test)
    here = runner._Run(runner.BenchConfig(data=str(source), tier="quick", subset=20, progress=False))
    there = runner._Run(runner.BenchConfig(data=str(tmp_path / "unpacked.npz"), tier="quick", subset=0))
    assert here.data_key == there.data_key  # so every cache and cell key matches too
    part = sorted(pack.glob("test-*.npz"))[0]
    with np.load(part) as p:
        codes, offsets = p["codes"].copy(), p["offsets"]
    codes[offsets[1] - 40 : offsets[1] - 20] ^= 1  # damage one image's pixels, keep its container readable
    np.savez(part, codes=codes, offsets=offsets)
    failed = _pack_cifar("unpack", str(pack), "--out", str(tmp_path / "again.npz"))
    assert failed.returncode != 0 and ("sha256" in failed.stderr or "Error" in failed.stderr)
    assert not (tmp_path / "again.npz").exists()


@pytest.mark.slow  # each script imports torch: ~5 s apiece
@pytest.mark.parametrize("script", sorted(p.name for p in PACK.parent.glob("*.py")))
def test_every_benchmark_script_explains_itself(script):
    done = subprocess.run([sys.executable, str(PACK.parent / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_frontier_marks_the_rows_no_other_row_beats(tmp_path, capsys):
    sys.path.insert(0, str(PACK.parent))
    try:
        import frontier
    finally:
        sys.path.remove(str(PACK.parent))
    cells = tmp_path / "standard" / "cells"
    cells.mkdir(parents=True)
    tier = frontier.TIERS["standard"]
    # eclipse: 80 clean, 50 everywhere; iss-jpeg: 78 clean, 40 everywhere (beaten); the squeeze: one column missing
    for defense, clean, score in (
        ("eclipse", 0.80, 0.50),
        ("iss-jpeg", 0.78, 0.40),
        ("border-despeckle-jpeg", 0.9, 0.6),
    ):
        for poison in ("clean", *tier["columns"], "adp"):
            if defense == "border-despeckle-jpeg" and poison == "tap":
                continue
            value = clean if poison == "clean" else score
            (cells / f"{poison}__{defense}.json").write_text(f'{{"test_accuracy": {value}}}')
    (cells / "lsp__eclipse.json").write_text('{"test_accuracy": 0.30}')  # eclipse's worst column
    (cells / "clean__border-despeckle-jpeg-clean2000.json").write_text('{"test_accuracy": 0.84}')  # clean cell only
    assert frontier.main(["--tier", "standard", "--results", str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert rows["eclipse"][1:4] == ["80.0", "48.0", "30.0 (lsp)"] and rows["eclipse"][-1] == "yes |"
    assert rows["iss-jpeg"][-1] == "yes |"  # worse mean and clean, but a better worst column (40 > 30)
    assert rows["border-despeckle-jpeg"][4] == "9 of 10" and rows["border-despeckle-jpeg"][-1] == "— |"
    assert rows["border-despeckle-jpeg-clean2000"][1:5] == ["84.0", "—", "— (—)", "0 of 10"]
    (cells / "lsp__iss-jpeg.json").write_text('{"test_accuracy": 0.20}')
    frontier.main(["--tier", "standard", "--results", str(tmp_path)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert rows["iss-jpeg"][-1] == "no |"  # now eclipse is ahead on all three


def test_refit_head_reads_the_heads_input_and_fits_a_planted_class_signal():
    sys.path.insert(0, str(PACK.parent))
    try:
        import refit_head
    finally:
        sys.path.remove(str(PACK.parent))
    from eclipse_transforms.bench.models import build_model

    torch.manual_seed(0)
    model = build_model("compact", (8, 8, 16), 3).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    f = refit_head.features(model, images)
    with torch.no_grad():  # the features are what the last linear layer (and the scale after it) turns into logits
        logits = model(images.float().div(255).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(model[-1](model[-2](f)), logits)
    # a head fitted on features where one coordinate carries the class: it learns it, and the picked L2 is the grid's
    y = torch.arange(60) % 3
    feats = torch.randn(60, 5)
    feats[:, 2] += 8 * y
    l2, scores = refit_head.pick_l2(feats, feats + 0.01 * torch.randn(60, 5), y)
    assert l2 in refit_head.L2_GRID and set(scores) == set(refit_head.L2_GRID) and max(scores.values()) > 0.9
    held = torch.randn(30, 5)
    held[:, 2] += 8 * (torch.arange(30) % 3)
    head = refit_head.fit_head(feats, y, l2)
    assert (head(held).argmax(1) == torch.arange(30) % 3).float().mean() > 0.9
    assert (
        refit_head.fit_head(torch.randn(60, 5), y, l2)(held).argmax(1) == torch.arange(30) % 3
    ).float().mean() < 0.7
