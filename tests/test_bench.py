"""The bench: classifier recipe pieces, defenses, the runner end to end on a tiny synthetic set, the report."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from eclipse_transforms.bench import classifier, runner, specs
from eclipse_transforms.bench.classifier import Recipe, random_crop_flip, train_classifier
from eclipse_transforms.bench.defenses import Defense, DefenseContext, get_defense, grayscale, jpeg, list_defenses
from eclipse_transforms.bench.rem import REMConfig
from eclipse_transforms.bench.report import accuracy_grid, format_table
from eclipse_transforms.bench.runner import BenchConfig, balanced_subset, load_bench_data, run_bench
from eclipse_transforms.bench.specs import parse_poison


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 6, generator=g)
    out = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 6] for dy in range(5) for dx in range(5)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in crops)
    again = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False, generator=g), x)


def test_defense_registry_and_errors():
    assert {"none", "iss-gray", "iss-jpeg", "eclipse", "purify-only", "compensation-only"} <= set(list_defenses())
    with pytest.raises(ValueError, match="unknown defense 'blur'; available: "):
        get_defense("blur")


def test_iss_defenses_match_torchvision():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(grayscale(x), v2.Grayscale(3)(x))
    expected = []
    for img in x:
        buf = io.BytesIO()
        v2.functional.to_pil_image(img).save(buf, format="JPEG", quality=10)
        expected.append(v2.functional.pil_to_tensor(Image.open(buf)))
    expected = torch.stack(expected)
    assert (expected.float() - x.float()).abs().mean() > 5  # quality 10 changes the image
    assert torch.equal(jpeg(x, 10), expected)
    assert torch.equal(get_defense("iss-jpeg").prepare(x, None), expected)
    with pytest.raises(ValueError, match="quality must be in"):
        jpeg(x, 0)


def test_compensation_defense_is_seeded_and_bounded():
    d = get_defense("compensation-only")
    x = (0.2 + 0.6 * torch.rand(64, 1, 8, 8)).expand(-1, 3, -1, -1)  # already gray, away from the clamp
    a = d.epoch_transform(x, torch.Generator().manual_seed(3))
    b = d.epoch_transform(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert (a - x).std() == pytest.approx(0.05, rel=0.1)


def test_purifying_defenses_cache_through_purified_dataset(tiny_folder, tmp_path):
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(6) % 2
    context = DefenseContext(weights=str(tiny_folder), cache_dir=str(tmp_path), t_star=6, progress=False)
    fast = get_defense("eclipse", context).prepare(images, labels)
    paper = get_defense("eclipse-paper-sampler", context).prepare(images, labels)
    assert fast.dtype == paper.dtype == torch.uint8 and fast.shape == paper.shape == images.shape
    assert not torch.equal(fast, paper)  # 4 steps vs t* = 6 ancestral steps
    sizes = sorted(
        json.loads((m.parent / "manifest.json").read_text())["meta"]["shard_size"]
        for m in tmp_path.glob("*/manifest.json")
    )
    assert sizes == [512, 4096]  # the 25x costlier paper sampler checkpoints in smaller shards


def test_eclipse_despeckle_purifies_the_despeckled_images(tiny_folder, tmp_path):
    from eclipse_transforms import functional as EF
    from eclipse_transforms.utils import quantize

    images = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    images[:, :, 3, 5] = 255  # a one-pixel shortcut
    labels = torch.arange(4) % 2
    context = DefenseContext(weights=str(tiny_folder), cache_dir=str(tmp_path), t_star=6, progress=False)
    defense = get_defense("eclipse-despeckle", context)
    assert defense.options["prefilter"] == "Despeckle(threshold=0.12549019607843137)"
    assert "prefilter" not in get_defense("eclipse", context).options  # ECLIPSE's cells keep their keys
    despeckled = quantize(EF.despeckle(images.float() / 255))
    assert (despeckled == 128).all()
    expected = get_defense("purify-only", context).prepare(despeckled, labels)
    assert torch.equal(defense.prepare(images, labels), expected)
    assert defense.epoch_transform is not None


def test_purifying_defenses_record_and_cache_a_lower_precision_apart(tiny_folder, tmp_path):
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(6) % 2
    fp32 = DefenseContext(weights=str(tiny_folder), cache_dir=str(tmp_path), t_star=6, progress=False)
    bf16 = dataclasses.replace(fp32, dtype="bfloat16")
    assert "dtype" not in get_defense("eclipse", fp32).options  # float32 cells keep the keys they had
    assert get_defense("eclipse", bf16).options["dtype"] == "bfloat16"
    assert "dtype" not in get_defense("compensation-only", bf16).options  # nothing to compute in bfloat16
    full = get_defense("purify-only", fp32).prepare(images, labels)
    half = get_defense("purify-only", bf16).prepare(images, labels)
    assert len(list(tmp_path.glob("*/manifest.json"))) == 2  # two caches, not one overwritten
    assert (full.int() - half.int()).abs().float().mean() < 8  # same purification, rounded differently


def test_balanced_subset():
    labels = torch.arange(100) % 4
    idx = balanced_subset(labels, 20, seed=0)
    assert len(idx) == 20 and torch.equal(torch.bincount(labels[idx]), torch.full((4,), 5))
    assert torch.equal(idx, balanced_subset(labels, 20, seed=0)) and torch.equal(idx, idx.sort().values)
    assert len(balanced_subset(labels, None, seed=0)) == 100
    with pytest.raises(ValueError, match="subset=2 is smaller"):
        balanced_subset(labels, 2, seed=0)


def test_train_classifier_learns_a_separable_toy_problem():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 2
    images = torch.randint(0, 100, (120, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[labels == 1] += 120  # class 1 is bright
    recipe = Recipe(widths=(8, 8, 8), epochs=10, batch_size=16, crop_padding=2)
    torch.manual_seed(7)
    callers_state = torch.get_rng_state()
    a = train_classifier(images[:80], labels[:80], images[80:], labels[80:], recipe, progress=False)
    assert torch.equal(torch.get_rng_state(), callers_state)  # seeded inside, without moving the caller's stream
    b = train_classifier(images[:80], labels[:80], images[80:], labels[80:], recipe, progress=False)
    assert a["test_accuracy"] > 0.9
    assert a["test_accuracy"] == b["test_accuracy"]  # seeded end to end


def test_training_resumes_from_its_epoch_checkpoint_bit_identically(tmp_path):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(96) % 3
    images = torch.randint(0, 256, (96, 3, 16, 16), generator=g, dtype=torch.uint8)
    recipe = Recipe(widths=(8, 8, 8), epochs=4, batch_size=32, crop_padding=2)

    def noisy(x, generator):  # an epoch transform drawing from the epoch's generator, like the compensation
        return (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)

    def fit(**kw):
        model, stats = classifier.fit_classifier(images, labels, recipe, epoch_transform=noisy, progress=False, **kw)
        return model.state_dict(), stats

    whole, _ = fit()

    class Interrupt(Exception):
        pass

    def stop_after_second_epoch(epoch, model):
        if epoch == 2:
            raise Interrupt  # before epoch 2's state is saved: the resume redoes it

    with pytest.raises(Interrupt):
        fit(checkpoint=tmp_path / "run", on_epoch=stop_after_second_epoch)
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert saved["epoch"] == 1
    seen = []
    resumed, stats = fit(checkpoint=tmp_path / "run", on_epoch=lambda e, m: seen.append(e))
    assert seen == [2, 3]  # epochs 0 and 1 were not trained again
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    assert stats["train_seconds"] > saved["seconds"] > 0  # both parts counted
    # The same folder with another seed is a different run: it starts over instead of resuming.
    other, _ = fit(checkpoint=tmp_path / "run", seed=5)
    fresh, _ = fit(seed=5)
    assert all(torch.equal(other[k], fresh[k]) for k in fresh)


def test_recipe_and_config_validation():
    with pytest.raises(ValueError, match="recipe epochs must be >= 1"):
        Recipe(epochs=0)
    with pytest.raises(ValueError, match="poisons: unknown \\['xyz'\\]"):
        BenchConfig(data="x", poisons="xyz")
    with pytest.raises(ValueError, match="tier must be one of quick, standard, paper"):
        BenchConfig(data="x", tier="huge")
    with pytest.raises(ValueError, match="purify_batch_size must be >= 1, got 0"):
        BenchConfig(data="x", purify_batch_size=0)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        BenchConfig(data="x", dtype="int8")
    assert BenchConfig(data="x", dtype="torch.bfloat16").dtype == "bfloat16"
    config = BenchConfig(data="x", poisons="LSP, ar", defenses=("none",), epochs=2)
    assert config.poisons == ("lsp", "ar") and config.recipe().epochs == 2
    assert BenchConfig.from_dict(config.to_dict()) == config


@pytest.fixture()
def toy_cifar(tmp_path):
    """A 32x32 three-class stand-in for CIFAR-10: class = which channel is bright."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 3
        x = rng.integers(0, 90, (n, 32, 32, 3), dtype=np.uint8)
        x[np.arange(n), :, :, y] += 120
        return x, y.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(36), split(12)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


def test_load_bench_data_is_the_balanced_subset_and_the_test_split_without_the_excluded(toy_cifar, tmp_path):
    exclude = tmp_path / "held.json"
    exclude.write_text(json.dumps({"indices": [0, 5, 11]}))
    data = load_bench_data(toy_cifar, 12, seed=3, exclude_test=exclude)
    z = np.load(toy_cifar)
    idx = balanced_subset(torch.from_numpy(z["y_train"]), 12, seed=3)
    assert torch.equal(data.labels, torch.from_numpy(z["y_train"])[idx])
    assert torch.equal(data.images, torch.from_numpy(z["x_train"]).permute(0, 3, 1, 2)[idx])
    keep = [i for i in range(12) if i not in (0, 5, 11)]
    assert torch.equal(data.test_labels, torch.from_numpy(z["y_test"])[keep]) and data.excluded_test_images == 3
    assert torch.equal(data.test_images, torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2)[keep])
    # the excluded images themselves: the defender's own clean set
    assert torch.equal(data.excluded_images, torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2)[[0, 5, 11]])
    unlabelled = tmp_path / "images.npz"
    np.savez(unlabelled, images=z["x_train"])
    with pytest.raises(ValueError, match="has no labels; the bench trains and tests on a labelled CIFAR-10"):
        load_bench_data(unlabelled, 12, seed=3)
    assert torch.equal(data.excluded_labels, torch.from_numpy(z["y_test"])[[0, 5, 11]])
    everything = load_bench_data(toy_cifar)
    assert len(everything.labels) == 36 and len(everything.test_labels) == 12 and everything.excluded_test_images == 0


def test_an_output_dir_the_bench_did_not_write_is_refused(toy_cifar, tmp_path):
    # The bench writes results.json, table.md and chart.png into output_dir: a user's folder holding files of
    # those names would lose them. A folder without the bench's bench_config.json is refused, untouched.
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "table.md").write_text("my table\n")
    config = BenchConfig(data=str(toy_cifar), poisons=("urp",), defenses=("none",), output_dir=str(mine))
    for train in (True, False):
        with pytest.raises(FileExistsError, match="holds files the bench did not write"):
            run_bench(config, train=train)
    assert (mine / "table.md").read_text() == "my table\n" and sorted(p.name for p in mine.iterdir()) == ["table.md"]
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        run_bench(dataclasses.replace(config, output_dir=str(mine / "table.md")), train=False)
    # an empty folder, and a folder an earlier run wrote, are the bench's to write
    (tmp_path / "empty").mkdir()
    run_bench(dataclasses.replace(config, output_dir=str(tmp_path / "empty")), train=False)
    run_bench(dataclasses.replace(config, output_dir=str(tmp_path / "empty")), train=False)
    assert (tmp_path / "empty" / "table.md").is_file()


def test_runner_end_to_end_and_resume(toy_cifar, tiny_folder, tmp_path, monkeypatch):
    config = BenchConfig(
        data=str(toy_cifar),
        poisons=("urp", "ops"),
        defenses=("none", "iss-jpeg", "eclipse", "purify-only", "compensation-only"),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        weights=str(tiny_folder),
        subset=0,
        epochs=1,
        widths=(8, 8, 8),
        t_star=20,
        purify_batch_size=7,  # not a divisor of the 36 images: the last batch is short
        progress=False,
    )
    results = run_bench(config)
    out = tmp_path / "out"
    assert len(results["cells"]) == 3 * 5
    assert {(c["poison"], c["defense"]) for c in results["cells"]} == {
        (p, d) for p in ("clean", "urp", "ops") for d in config.defenses
    }
    for cell in results["cells"]:
        assert 0 <= cell["test_accuracy"] <= 1 and cell["test_images"] == 12 and cell["train_images"] == 36
        assert cell["recipe"]["epochs"] == 1 and cell["version"]
        assert cell["machine"].endswith(f"{torch.get_num_threads()} torch threads, cpu")  # where timings came from
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == results["cells"]
    table = (out / "table.md").read_text()
    assert table.startswith("| defense | clean | URP | OPS | mean |") and "| purify-only |" in table
    pytest.importorskip("matplotlib")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cache" / "poisoned").glob("*.safetensors"))) == 2
    assert (tmp_path / "cache" / "purified").is_dir()
    assert not any((tmp_path / "cache" / "training").iterdir())  # per-epoch checkpoints go once a cell is written

    # A re-run trains nothing; a damaged cell and a changed recipe retrain just what they touch.
    calls = []
    real = classifier.train_classifier
    monkeypatch.setattr(runner, "train_classifier", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    assert run_bench(config)["cells"] == results["cells"]
    assert calls == []
    (out / "cells" / "ops__none.json").write_text("{not json")
    run_bench(config)
    assert calls == ["ops/none"]
    run_bench(BenchConfig.from_dict({**config.to_dict(), "defenses": ["none"], "epochs": 2}))
    assert calls[1:] == ["clean/none", "urp/none", "ops/none"]
    # ... and what they replace is set aside, never overwritten: the damaged file and the three 1-epoch results
    aside = {p.name: p for p in (out / "cells" / "superseded").iterdir()}
    assert "ops__none.unreadable.json" in aside and len(aside) == 4
    kept = [json.loads(p.read_text()) for name, p in aside.items() if "unreadable" not in name]
    assert sorted(c["poison"] for c in kept) == ["clean", "ops", "urp"]
    assert all(c["recipe"]["epochs"] == 1 for c in kept)

    # Set aside only when the settings differ: a cell with the same key (two identical runs side by side) is
    # replaced in place, and a file that is valid JSON but not a cell is kept as "unknown".
    cell_file = out / "cells" / "urp__none.json"
    runner._Run._set_aside(cell_file, json.loads(cell_file.read_text())["key"])
    assert cell_file.is_file() and len(list((out / "cells" / "superseded").iterdir())) == 4
    cell_file.write_text("[1, 2]")
    runner._Run._set_aside(cell_file, "abc")
    assert not cell_file.exists() and (out / "cells" / "superseded" / "urp__none.unknown.json").is_file()
    run_bench(BenchConfig.from_dict({**config.to_dict(), "defenses": ["none"], "epochs": 2}))
    assert calls[4:] == ["urp/none"]

    # Report only: trains nothing and tabulates just the cells run with these settings (the 2-epoch run
    # replaced the 'none' cells, so the 1-epoch config now finds them stale and leaves them out).
    del calls[:]
    report = run_bench(config, train=False)
    assert calls == []
    assert {(c["poison"], c["defense"]) for c in report["cells"]} == {
        (p, d) for p in ("clean", "urp", "ops") for d in config.defenses if d != "none"
    }
    assert json.loads((out / "results.json").read_text())["cells"] == report["cells"]
    written = json.loads((out / "bench_config.json").read_text())
    assert written == {k: v for k, v in config.to_dict().items() if k != "progress"}  # describes the table
    assert json.loads((out / "results.json").read_text())["config"] == written
    assert "| none | — | — | — | — |" in (out / "table.md").read_text()
    two_epochs = BenchConfig.from_dict({**config.to_dict(), "epochs": 2, "poisons": ["ops"], "clean": False})
    assert [(c["poison"], c["defense"]) for c in run_bench(two_epochs, train=False)["cells"]] == [("ops", "none")]
    assert calls == []


def test_report_with_missing_cells():
    results = {
        "columns": ["clean", "lsp", "ar"],
        "defenses": ["none", "eclipse"],
        "cells": [
            {"poison": "clean", "defense": "none", "test_accuracy": 0.9, "test_images": 8000},
            {"poison": "lsp", "defense": "none", "test_accuracy": 0.2, "test_images": 8000},
            {"poison": "ar", "defense": "none", "test_accuracy": 0.4, "test_images": 8000},
            {"poison": "lsp", "defense": "eclipse", "test_accuracy": 0.8, "test_images": 8000},
        ],
        "config": {"seed": 0},
        "tier": {"name": "quick", "about": "toy"},
        "version": "0",
    }
    grid = accuracy_grid(results)
    assert grid["none"]["mean"] == pytest.approx(30.0) and grid["eclipse"]["mean"] is None
    table = format_table(results)
    assert "| none | 90.0 | 20.0 | 40.0 | 30.0 |" in table
    assert "| eclipse | — | 80.0 | — | — |" in table


def test_cli_bench_help():
    from eclipse_transforms.cli import build_parser

    args = build_parser().parse_args(["bench", "--data", "d.npz", "--poisons", "lsp", "--widths", "8", "8", "8"])
    assert args.poisons == "lsp" and args.widths == [8, 8, 8] and args.tier == "quick"
    assert not args.report_only
    assert build_parser().parse_args(["bench", "--data", "d.npz", "--report-only"]).report_only


def test_defense_context_defaults():
    assert DefenseContext().t_star == 100 and DefenseContext().weights is None


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8) % 3
    adv = classifier._pgd(model, x, y, 8 / 255, 5, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)
    assert get_defense("adv-training").adversarial_epsilon == pytest.approx(8 / 255)


def test_pgd_can_stop_after_the_first_epochs(monkeypatch):
    calls = []
    real = classifier._pgd

    def counting(model, x, *args):
        calls.append(len(x))
        return real(model, x, *args)

    monkeypatch.setattr(classifier, "_pgd", counting)
    images = torch.randint(0, 256, (32, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(32) % 2
    recipe = Recipe(widths=(4, 4, 4), epochs=3, batch_size=16, adversarial_epsilon=2 / 255, adversarial_steps=1)
    train_classifier(images, labels, images[:8], labels[:8], recipe, progress=False)
    assert len(calls) == 6  # 2 batches x 3 epochs
    calls.clear()
    first = dataclasses.replace(recipe, adversarial_epochs=1)
    train_classifier(images, labels, images[:8], labels[:8], first, progress=False)
    assert len(calls) == 2  # the first epoch only
    # Keyed only when set: every earlier cell keeps its key.
    assert "adversarial_epochs" not in recipe.to_dict() and first.to_dict()["adversarial_epochs"] == 1
    assert Recipe.from_dict(first.to_dict()) == first
    with pytest.raises(ValueError, match="adversarial_epochs must be >= 1"):
        Recipe(adversarial_epochs=0)


def test_worst_of_trains_each_image_on_its_highest_loss_draw(monkeypatch):
    # _worst_of: per image, the candidate with the highest cross-entropy, in train mode again afterwards.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 2))
    candidates = [torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    y = torch.tensor([0, 1, 0, 1, 1])
    picked = classifier._worst_of(model, candidates, y)
    with torch.no_grad():
        losses = torch.stack([torch.nn.functional.cross_entropy(model(c), y, reduction="none") for c in candidates])
    for i, k in enumerate(losses.argmax(0).tolist()):
        assert torch.equal(picked[i], candidates[k][i])
    assert len(set(losses.argmax(0).tolist())) > 1 and model.training  # not one candidate for all
    # In training: k draws of the epoch transform and crop/flip per step, one kept per image.
    draws, kept = [], []
    real = classifier._worst_of

    def counting(model, candidates, y):
        draws.append(len(candidates))
        kept.append(real(model, candidates, y))
        return kept[-1]

    monkeypatch.setattr(classifier, "_worst_of", counting)
    images = torch.randint(0, 256, (32, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(32) % 2
    recipe = Recipe(widths=(4, 4, 4), epochs=2, batch_size=16, worst_of=3)
    a = train_classifier(images, labels, images[:8], labels[:8], recipe, progress=False)
    assert draws == [3, 3, 3, 3] and all(x.shape == (16, 3, 16, 16) for x in kept)  # 2 batches x 2 epochs
    b = train_classifier(images, labels, images[:8], labels[:8], recipe, progress=False)
    assert torch.equal(kept[0], kept[4]) and (a["train_accuracy"], a["test_accuracy"]) == (
        b["train_accuracy"],
        b["test_accuracy"],
    )  # seeded: the second run picks the same draws
    # Keyed only when set: every earlier cell keeps its key.
    assert "worst_of" not in Recipe().to_dict() and recipe.to_dict()["worst_of"] == 3
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="recipe worst_of must be >= 1"):
        Recipe(worst_of=0)


def _spied_run(defense, toy_cifar, tmp_path, monkeypatch, **config):
    """A runner whose every cell is ``defense`` and whose trainer only records what it was handed."""
    seen = {}

    def spy(images, labels, test_images, test_labels, recipe, **kwargs):
        seen.update(images=images, labels=labels, test_labels=test_labels, recipe=recipe)
        return {"test_accuracy": 0.5, "train_accuracy": 0.5, "train_seconds": 0.0, "images_per_second": 1.0,
                "parameters": 1}  # fmt: skip

    monkeypatch.setattr(runner, "train_classifier", spy)
    monkeypatch.setattr(runner, "get_defense", lambda name, context=None: defense)
    config = BenchConfig(
        data=str(toy_cifar),
        poisons="urp",
        defenses=("none",),
        clean=False,
        subset=0,
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        **config,
    )
    return runner._Run(config), seen


def test_runner_hands_a_defense_its_pgd_steps(toy_cifar, tmp_path, monkeypatch):
    light = Defense(
        "light-at",
        adversarial_epsilon=4 / 255,
        adversarial_steps=2,
        adversarial_epochs=3,
        worst_of=3,
        options={"pgd": "4/255, 2", "worst_of": 3},
    )
    run, seen = _spied_run(light, toy_cifar, tmp_path, monkeypatch)
    run.run_cell("urp", "light-at")
    assert seen["recipe"].adversarial_epsilon == pytest.approx(4 / 255) and seen["recipe"].adversarial_steps == 2
    assert seen["recipe"].adversarial_epochs == 3 and seen["recipe"].worst_of == 3
    assert get_defense("adv-training").adversarial_steps == 10  # the registered row keeps PGD-10


def test_runner_adds_the_defenders_clean_images_as_they_are(toy_cifar, tmp_path, monkeypatch):
    # clean_images=n: the cell trains on the defense's one-time stages of the poisoned set plus n class-balanced
    # images of the excluded test images (the denoiser's sparse set), those untouched by the one-time stages.
    inverted = Defense("invert-clean", prepare=lambda x, y: 255 - x, clean_images=6, options={"clean_images": 6})
    exclude = tmp_path / "held.json"
    exclude.write_text(json.dumps({"indices": [0, 1, 2, 3, 4, 5, 6, 7]}))
    run, seen = _spied_run(inverted, toy_cifar, tmp_path, monkeypatch, exclude_test=str(exclude))
    cell = run.run_cell(runner.CLEAN, "invert-clean")
    z = np.load(toy_cifar)
    train = torch.from_numpy(z["x_train"]).permute(0, 3, 1, 2)
    held = torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2)[:8]
    held_labels = torch.from_numpy(z["y_test"])[:8]
    pick = balanced_subset(held_labels, 6, 0)
    assert torch.equal(seen["images"], torch.cat([255 - train, held[pick]]))  # the clean ones not inverted
    assert torch.equal(seen["labels"], torch.cat([torch.from_numpy(z["y_train"]), held_labels[pick]]))
    assert len(seen["test_labels"]) == 4 and cell["train_images"] == len(train) + 6 == 42
    with pytest.raises(ValueError, match="asks for 9 images of the defender's clean set.*excludes 8"):
        run._with_clean_images(train, 9)
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        run._with_clean_images(train, 6, 0)
    doubled, doubled_labels = run._with_clean_images(train, 6, 2)
    assert torch.equal(doubled[-12:], torch.cat([held[pick], held[pick]])) and len(doubled_labels) == 36 + 12
    # the public form scripts use (benchmarks/refit_head.py) is the same rule
    appended = runner.append_clean_images(train, torch.from_numpy(z["y_train"]), held, held_labels, 6, 0, 2)
    assert torch.equal(appended[0], doubled) and torch.equal(appended[1], doubled_labels)
    with pytest.raises(ValueError, match="n=9 clean images asked for; clean has 8"):
        runner.append_clean_images(train, torch.from_numpy(z["y_train"]), held, held_labels, 9, 0)


def test_border_despeckle_jpeg_defense_is_the_library_transforms():
    # The bench's border-despeckle-jpeg row is what a user builds from the library (docs/usage.md): RepairBorder,
    # Despeckle at 64/255 and JPEGCompression(20) once, then CorruptionCompensation(0.4, sigma=0) every epoch.
    from eclipse_transforms import CorruptionCompensation, Despeckle, JPEGCompression, RepairBorder

    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, :, 5, 7] = 255  # an outlier pixel the despeckle takes and JPEG alone would smear
    defense = get_defense("border-despeckle-jpeg")
    squeezed = defense.prepare(x, None)
    assert torch.equal(squeezed, JPEGCompression(20)(Despeckle(64 / 255)(RepairBorder()(x))))
    assert not torch.equal(squeezed, jpeg(x, 20)) and not torch.equal(squeezed, jpeg(RepairBorder()(x), 20))
    batch = squeezed.float() / 255
    ours = defense.epoch_transform(batch, torch.Generator().manual_seed(3))
    theirs = CorruptionCompensation(0.4, sigma=0.0).compensate(batch, torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)
    assert defense.options == {"ring": 1, "threshold": 64, "quality": 20, "p_gray": 0.4}
    # ... and what EclipsePurify() does by default: the row the README shows is the library's default
    from eclipse_transforms import EclipsePurify

    default = EclipsePurify()
    assert torch.equal(default.purify_batch(x.float() / 255), squeezed.float() / 255)
    again = default.compensation.compensate(batch, torch.Generator().manual_seed(3))
    assert torch.equal(again, ours)


@pytest.mark.parametrize(
    ("name", "n", "repeat"),
    [("border-despeckle-jpeg-clean2000x5", 2000, 5), ("border-despeckle-jpeg-clean400", 400, 1)],
)
def test_trusted_squeeze_rows_are_the_squeeze_plus_trusted_images(name, n, repeat):
    # The bench's trusted rows are the squeeze's stages unchanged, plus n trusted images shown repeat times an epoch;
    # their options (in every cell's key) say so, and a repeat of 1 stays out of them (the keys of cells run before).
    squeeze, trusted = get_defense("border-despeckle-jpeg"), get_defense(name)
    assert (trusted.name, trusted.clean_images, trusted.clean_repeat) == (name, n, repeat)
    assert trusted.options == {
        **squeeze.options,
        "clean_images": n,
        **({"clean_repeat": repeat} if repeat > 1 else {}),
    }
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trusted.prepare(x, None), squeeze.prepare(x, None))
    batch = x.float() / 255
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert torch.equal(trusted.epoch_transform(batch, g()), squeeze.epoch_transform(batch, g()))
    assert squeeze.clean_images == 0


def test_models_shapes_and_sizes():
    from eclipse_transforms.bench.models import build_model

    compact = build_model("compact", (32, 64, 128))
    assert sum(p.numel() for p in compact.parameters()) == 295_096  # the size the README and tiers quote
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert compact(x).shape == (2, 10)
    resnet = build_model("resnet18", num_classes=7).eval()
    assert resnet(x).shape == (2, 7) and resnet.conv1.stride == (1, 1)
    with pytest.raises(ValueError, match="model must be 'compact' or 'resnet18'"):
        build_model("vit")
    with pytest.raises(ValueError, match="widths must be three ints"):
        build_model("compact", (32, 64))


@pytest.mark.slow
@pytest.mark.cifar
def test_runner_on_real_cifar10_holds_out_the_sparse_set(tmp_path):
    from .conftest import cifar_npz

    path = cifar_npz()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set ECLIPSE_CIFAR10 or put cifar10.npz in ../shared/data/cifar10/")
    config = BenchConfig(
        data=str(path),
        poisons=("lsp",),
        defenses=("none", "eclipse"),
        subset=100,
        epochs=1,
        widths=(8, 8, 8),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    results = run_bench(config)
    assert {c["test_images"] for c in results["cells"]} == {8000}  # 10,000 minus the 2,000 sparse-set images
    assert {c["train_images"] for c in results["cells"]} == {100}
    assert "| eclipse |" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.cifar
@pytest.mark.parametrize("folder", ["standard", "quick", "quick-tstar/t200", "quick-tstar/t300", "quick-bf16"])
def test_committed_cells_match_the_current_keys(folder):
    """A change to the runner's keys would silently retrain (or orphan) every committed result."""
    from pathlib import Path

    from .conftest import cifar_npz

    path = cifar_npz()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set ECLIPSE_CIFAR10 or put cifar10.npz in ../shared/data/cifar10/")
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / folder
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert cells, f"no committed cells in {out}"
    settings = json.loads((out / "bench_config.json").read_text())
    run = runner._Run(BenchConfig.from_dict({**settings, "data": str(path), "progress": False}))
    for cell in cells:
        defense = get_defense(cell["defense"], run.context)
        assert run.cell_key(cell["poison"], defense.options, cell["defense"]) == cell["key"], cell["poison"]
        report = cell["poison_report"]
        if report is not None:  # a model-based poison: the column names what it was crafted with
            crafted = report["config"]
            if "defense" in report:  # ADP reports its EM settings and the defense it crafted through apart
                crafted = {**report["defense"], "em": report["config"]}
            assert specs.poison_settings(cell["poison"]) == crafted, cell["poison"]


def test_keys_follow_the_real_settings_not_the_spec_text(toy_cifar, monkeypatch):
    """Moving a default must keep the results of every poison whose real settings did not change."""
    config = BenchConfig(data=str(toy_cifar), poisons="rem", defenses=("none",), subset=0, progress=False)
    run = runner._Run(config)
    before = run.cell_key("rem[train_steps=300,lr_decay_steps=120]", {}, "none")
    assert before != run.cell_key("rem", {}, "none")
    old_default = REMConfig(train_steps=300, lr_decay_steps=120)
    monkeypatch.setattr(specs, "_crafting_config", lambda name: old_default if name == "rem" else None)
    assert parse_poison("rem[train_steps=300,lr_decay_steps=120]")[2] == "rem"
    assert run.cell_key("rem", {}, "none") == before  # the same crafting under its new name keeps its key
    assert run.cell_key("rem[train_steps=2000]", {}, "none") != before


def test_runner_crafts_model_based_poisons_on_the_bench_device(toy_cifar, tmp_path, monkeypatch):
    from eclipse_transforms.bench.em import EMConfig

    seen, default = {}, EMConfig()

    def spy(images, labels, *, seed=0, config=default, work_dir=None, progress=True, device="cpu"):
        seen.update(device=device, work_dir=work_dir)
        return images.clone()

    real = runner.get_poison
    monkeypatch.setattr(runner, "get_poison", lambda name: spy if name == "em" else real(name))
    config = BenchConfig(
        data=str(toy_cifar), poisons="em", defenses="none", subset=0, cache_dir=str(tmp_path), device="cpu:0"
    )
    runner._Run(config).poisoned("em")
    assert seen["device"] == "cpu:0" and seen["work_dir"] is not None


def test_bench_device_is_checked():
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu' or 'cuda', got 'gpu'"):
        BenchConfig(data="x", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here; use --device cpu"):
            run_bench(BenchConfig(data="x", device="cuda"))


def test_runner_keeps_a_poison_variant_apart_from_its_default(toy_cifar, tmp_path):
    config = BenchConfig(
        data=str(toy_cifar),
        poisons="urp,urp[epsilon=16/255]",
        defenses=("none",),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        clean=False,
        subset=0,
        epochs=1,
        widths=(8, 8, 8),
        progress=False,
    )
    results = run_bench(config)
    cells = {c["poison"]: c for c in results["cells"]}
    assert set(cells) == {"urp", "urp[epsilon=16/255]"} and cells["urp"]["key"] != cells["urp[epsilon=16/255]"]["key"]
    assert cells["urp[epsilon=16/255]"]["poison_overrides"] == {"epsilon": pytest.approx(16 / 255)}
    assert "poison_overrides" not in cells["urp"]
    assert (tmp_path / "out" / "cells" / "urp[epsilon=16_255]__none.json").is_file()
    assert (tmp_path / "out" / "cells" / "urp__none.json").is_file()
    assert "| defense | URP | URP[epsilon=16/255] | mean |" in (tmp_path / "out" / "table.md").read_text()
    # A later training run over one column adds to the folder's table instead of replacing it.
    one = BenchConfig.from_dict({**config.to_dict(), "poisons": ["urp"], "defenses": ["iss-gray"]})
    merged = run_bench(one)
    assert merged["columns"] == ["urp", "urp[epsilon=16/255]"] and merged["defenses"] == ["none", "iss-gray"]
    assert {(c["poison"], c["defense"]) for c in merged["cells"]} == {
        ("urp", "none"),
        ("urp[epsilon=16/255]", "none"),
        ("urp", "iss-gray"),
    }
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| defense | URP | URP[epsilon=16/255] | mean |" in table and "| iss-gray |" in table
    assert json.loads((tmp_path / "out" / "bench_config.json").read_text())["poisons"] == merged["columns"]
    # --report-only tabulates exactly what it is given; without a cache_dir of its own it records the one the
    # cells were run with, not None (which would say "the default cache").
    assert run_bench(one, train=False)["columns"] == ["urp"]
    assert json.loads((tmp_path / "out" / "bench_config.json").read_text())["cache_dir"] == config.cache_dir
    report = run_bench(dataclasses.replace(one, cache_dir=None), train=False)
    assert report["config"]["cache_dir"] == config.cache_dir is not None
    # Another tier's layout, or a bench_config.json this version cannot read, is not merged.
    other = BenchConfig.from_dict({**config.to_dict(), "tier": "standard", "poisons": ["urp"], "defenses": ["none"]})
    assert runner._layout(other, runner._earlier(tmp_path / "out")) == other
    (tmp_path / "out" / "bench_config.json").write_text('{"poisons": ["no-such-poison"]}')
    assert runner._earlier(tmp_path / "out") is None
    assert runner._layout(one, runner._earlier(tmp_path / "out")) == one
    run = runner._Run(config)
    clean = run.images.float()
    for spec, budget in (("urp", 8), ("urp[epsilon=16/255]", 16)):
        linf = (run.poisoned(spec)[0].float() - clean).abs().max().item()
        assert budget - 1 <= linf <= budget, spec  # measured on the uint8 output
