from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from eclipse_transforms.cli import main

from .test_training import synthetic_npz


def purify_args(tiny_folder, tmp_path):
    return ["--weights", str(tiny_folder), "--t-star", "10", "--steps", "2", "--cache-dir", str(tmp_path / "cache")]


def test_demo_writes_a_grid(tiny_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--no-progress", "demo", "--weights", str(tiny_folder), "--t-star", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PSNR purified vs clean" in printed and "poison residue" in printed
    with PIL.Image.open(out) as im:
        assert im.size[0] > 8 * 8 and im.mode == "RGB"


def test_bench_help_lists_every_poison_and_defense(capsys, monkeypatch):
    from eclipse_transforms.bench import list_defenses, list_poisons

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps the epilog to the terminal's width
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    epilog = capsys.readouterr().out.split("poisons: ", 1)[1]
    free = epilog.split(" (model-free")[0].split(", ")
    crafted = epilog.split("; ", 1)[1].split(" (crafted")[0].split(", ")
    assert free == ["ar", "cuda", "lsp", "ops", "urp"] and crafted == ["adp", "em", "rem", "sep", "tap"]
    assert sorted(free + crafted) == list_poisons()
    assert epilog.split("defenses: ")[1].strip().rstrip(".").split(", ") == list_defenses()


def test_purify_npz_to_npz(tiny_folder, tmp_path):
    src = synthetic_npz(tmp_path / "in.npz", n=5)
    dst = tmp_path / "out.npz"
    assert main(["--no-progress", "purify", str(src), str(dst), *purify_args(tiny_folder, tmp_path)]) == 0
    with np.load(src) as a, np.load(dst) as b:
        assert b["images"].shape == a["images"].shape and b["images"].dtype == np.uint8
        assert (b["labels"] == a["labels"]).all() and not (b["images"] == a["images"]).all()
    # Same settings again: an existing output is refused, --overwrite replaces it from the cache.
    assert main(["purify", str(src), str(dst), *purify_args(tiny_folder, tmp_path)]) == 2
    assert (
        main(["--no-progress", "purify", str(src), str(dst), "--overwrite", *purify_args(tiny_folder, tmp_path)]) == 0
    )


def test_purify_in_bfloat16_is_cached_apart_from_float32(tiny_folder, tmp_path):
    src = synthetic_npz(tmp_path / "in.npz", n=4)
    args = purify_args(tiny_folder, tmp_path)
    assert main(["--no-progress", "purify", str(src), str(tmp_path / "a.npz"), *args]) == 0
    assert main(["--no-progress", "purify", str(src), str(tmp_path / "b.npz"), "--dtype", "bfloat16", *args]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache entry per precision
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
        assert diff.max() <= 12 and diff.mean() < 2  # the same noise, rounded differently
    with pytest.raises(SystemExit):
        main(["purify", str(src), str(tmp_path / "c.npz"), "--dtype", "int8", *args])


def test_purify_image_folder_keeps_its_layout(tiny_folder, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(2):
            PIL.Image.fromarray(rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)).save(
                tmp_path / "in" / cls / f"x{i}.png"
            )
    out = tmp_path / "out"
    assert main(["--no-progress", "purify", str(tmp_path / "in"), str(out), *purify_args(tiny_folder, tmp_path)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["cat/x0.png", "cat/x1.png", "dog/x0.png", "dog/x1.png"]
    with PIL.Image.open(out / "cat" / "x0.png") as im:
        assert im.size == (8, 12)


def test_info_prints_the_config(tiny_folder, capsys):
    assert main(["info", "--weights", str(tiny_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["t_max"] == 40 and info["scheduler"]["num_train_timesteps"] == 100 and len(info["fingerprint"]) == 64


def test_train_command(tmp_path):
    data = synthetic_npz(tmp_path / "d.npz")
    out = tmp_path / "model"
    argv = [
        "--no-progress",
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--block-out-channels",
        "8",
        "16",
        "--norm-num-groups",
        "4",
        "--t-max",
        "20",
        "--num-train-timesteps",
        "100",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-flip",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["block_out_channels"] == [8, 16] and cfg["flip"] is False and cfg["max_steps"] == 2
    assert main(argv) == 2  # exists without --overwrite
    assert main([*argv[:-2], "3", "--no-flip", "--resume"]) == 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3


@pytest.mark.parametrize("steps", ["0", "abc"])
def test_bad_steps_argument(tiny_folder, tmp_path, steps):
    src = synthetic_npz(tmp_path / "in.npz", n=2)
    argv = [
        "purify",
        str(src),
        str(tmp_path / "o.npz"),
        "--weights",
        str(tiny_folder),
        "--t-star",
        "10",
        "--steps",
        steps,
    ]
    if steps == "abc":
        with pytest.raises(SystemExit, match="--steps must be an int or 'paper'"):
            main(argv)
    else:
        assert main(argv) == 2
