from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from eclipse_transforms.cli import main

from .test_training import synthetic_npz


def eclipse_args(tiny_folder, steps="2"):
    """The options that run ECLIPSE's diffusion with the tiny test weights."""
    return ["--recipe", "eclipse", "--weights", str(tiny_folder), "--t-star", "10", "--steps", steps]


def purify_args(tiny_folder, tmp_path):
    return [*eclipse_args(tiny_folder), "--cache-dir", str(tmp_path / "cache")]


def test_demo_writes_a_grid(tiny_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "--no-progress",
                "demo",
                "--recipe",
                "eclipse",
                "--weights",
                str(tiny_folder),
                "--t-star",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
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


def test_purify_npz_to_npz(tiny_folder, tmp_path, capsys):
    src = synthetic_npz(tmp_path / "in.npz", n=5)
    dst = tmp_path / "out.npz"
    assert main(["--no-progress", "purify", str(src), str(dst), *purify_args(tiny_folder, tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {dst}\n"  # the path alone on stdout; what the output lacks on stderr
    assert "per-epoch stage, CorruptionCompensation(p_gray=0.4, sigma=0.05), is part of the defense" in err
    with np.load(src) as a, np.load(dst) as b:
        assert b["images"].shape == a["images"].shape and b["images"].dtype == np.uint8
        assert (b["labels"] == a["labels"]).all() and not (b["images"] == a["images"]).all()
    # Same settings again: an existing output is refused, --overwrite replaces it from the cache.
    assert main(["purify", str(src), str(dst), *purify_args(tiny_folder, tmp_path)]) == 2
    assert (
        main(["--no-progress", "purify", str(src), str(dst), "--overwrite", *purify_args(tiny_folder, tmp_path)]) == 0
    )
    # A split-keyed input (x_test, y_test) comes out under the keys every output has: images and labels.
    with np.load(src) as a:
        np.savez(tmp_path / "split.npz", x_test=a["images"], y_test=a["labels"], x_train=a["images"][:1])
    out = tmp_path / "split-out.npz"
    args = ["--no-progress", "purify", str(tmp_path / "split.npz"), str(out), "--split", "test"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (
        "--recipe squeeze's one-time stages; its per-epoch stage, CorruptionCompensation(p_gray=0.4, sigma=0.0)"
        in (capsys.readouterr().err)
    )
    with np.load(src) as a, np.load(out) as b:
        assert sorted(b.files) == ["images", "labels"] and (b["labels"] == a["labels"]).all()
        assert b["images"].shape == a["images"].shape


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


def image_folder(root, per_class: int, size: tuple[int, int], seed: int = 0) -> None:
    """An ImageFolder tree ``root/{cat,dog}/x{i}.png`` of random RGB images of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / cls / f"x{i}.png")


def test_purify_image_folder_keeps_its_layout(tiny_folder, tmp_path):
    image_folder(tmp_path / "in", 2, (12, 8))
    out = tmp_path / "out"
    assert main(["--no-progress", "purify", str(tmp_path / "in"), str(out), *purify_args(tiny_folder, tmp_path)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["cat/x0.png", "cat/x1.png", "dog/x0.png", "dog/x1.png"]
    with PIL.Image.open(out / "cat" / "x0.png") as im:
        assert im.size == (8, 12)


def test_a_folder_input_is_read_image_by_image_with_the_same_result(tiny_folder, tmp_path, monkeypatch, capsys):
    from eclipse_transforms import _purify_files
    from eclipse_transforms.utils import load_image_set

    image_folder(tmp_path / "in", 3, (8, 8), seed=1)
    rng = np.random.default_rng(2)
    whole = load_image_set(tmp_path / "in")  # what the folder holds, read at once here, never by purify

    def refuse(*args, **kwargs):
        raise AssertionError("purify loaded the whole folder into memory")

    monkeypatch.setattr(_purify_files, "load_image_set", refuse)
    args = purify_args(tiny_folder, tmp_path)
    assert main(["--no-progress", "purify", str(tmp_path / "in"), str(tmp_path / "a.npz"), *args]) == 0
    assert main(["--no-progress", "purify", str(tmp_path / "in"), str(tmp_path / "b.npz"), *args,
                 "--num-workers", "2", "--cache-dir", str(tmp_path / "other-cache")]) == 0  # fmt: skip
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and a["images"].shape == (6, 8, 8, 3)
        assert a["labels"].tolist() == whole.labels.tolist() == [0, 0, 0, 1, 1, 1]
    PIL.Image.fromarray(rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)).save(tmp_path / "in" / "dog" / "odd.png")
    capsys.readouterr()
    assert main(["--no-progress", "purify", str(tmp_path / "in"), str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert "different sizes" in err and "odd.png" in err


def test_info_prints_the_config(tiny_folder, capsys):
    assert main(["info", "--weights", str(tiny_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["t_max"] == 40 and info["scheduler"]["num_train_timesteps"] == 100 and len(info["fingerprint"]) == 64
    assert info["used_by"].startswith("recipe='eclipse'")  # not the default recipe, which loads no denoiser


def test_commands_other_than_bench_do_not_load_the_bench(tiny_folder):
    code = (
        "import sys\n"
        "from eclipse_transforms.cli import main\n"
        f"main(['info', '--weights', {str(tiny_folder)!r}])\n"
        "print(sorted(m for m in sys.modules if m.startswith('eclipse_transforms.bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


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
    argv = ["purify", str(src), str(tmp_path / "o.npz"), *eclipse_args(tiny_folder, steps)]
    if steps == "abc":
        with pytest.raises(SystemExit, match="--steps must be an int or 'paper'"):
            main(argv)
    else:
        assert main(argv) == 2


def test_purify_defaults_to_the_squeeze_and_refuses_diffusion_options_without_eclipse(tiny_folder, tmp_path):
    from eclipse_transforms import EclipsePurify
    from eclipse_transforms._data import load_image_set

    src = synthetic_npz(tmp_path / "in.npz", n=4)
    dst = tmp_path / "out.npz"
    assert main(["--no-progress", "purify", str(src), str(dst), "--cache-dir", str(tmp_path / "cache")]) == 0
    squeezed = EclipsePurify(compensation=None)(load_image_set(src, split="train").images)
    assert torch.equal(load_image_set(dst, split="train").images, squeezed)
    for option in (["--t-star", "10"], ["--weights", str(tiny_folder)], ["--steps", "paper"]):
        with pytest.raises(SystemExit, match=f"{option[0]} sets the diffusion.*add --recipe eclipse"):
            main(["purify", str(src), str(tmp_path / "o.npz"), *option])


# -- --overwrite never deletes what the command did not write; user errors are one line --------------------------


def run_purify(tiny_folder, tmp_path, src, dst, *extra):
    return main(["--no-progress", "purify", str(src), str(dst), *purify_args(tiny_folder, tmp_path), *extra])


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_current_folder_and_the_input(tiny_folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    src = synthetic_npz(work / "c.npz", n=4)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(work)
    assert run_purify(tiny_folder, tmp_path, "c.npz", ".", "--overwrite") == 2
    assert "is or contains the current folder" in capsys.readouterr().err
    assert run_purify(tiny_folder, tmp_path, "c.npz", "c.npz", "--overwrite") == 2
    assert "is or contains the input" in capsys.readouterr().err
    assert run_purify(tiny_folder, tmp_path, src, tmp_path, "--overwrite") == 2  # contains the input and the cwd
    assert snapshot(work) == before


def test_overwrite_refuses_a_folder_holding_the_input(tiny_folder, tmp_path, capsys):
    proj = tmp_path / "proj"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (proj / split / cls).mkdir(parents=True)
            PIL.Image.new("RGB", (8, 12), (40, 80, 120)).save(proj / split / cls / "x.png")
    before = snapshot(proj)
    assert run_purify(tiny_folder, tmp_path, proj / "train", proj, "--overwrite") == 2
    assert run_purify(tiny_folder, tmp_path, proj / "train", proj / "train" / "out") == 2  # would join the input
    assert "lies inside the input" in capsys.readouterr().err
    assert snapshot(proj) == before


def test_overwrite_replaces_only_its_own_output(tiny_folder, tmp_path, capsys):
    src = synthetic_npz(tmp_path / "in.npz", n=4)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "photo.png").write_bytes(b"not ours")
    assert run_purify(tiny_folder, tmp_path, src, theirs, "--overwrite") == 2
    assert "did not write" in capsys.readouterr().err and snapshot(theirs) == {"photo.png": b"not ours"}
    # An empty folder is fine without --overwrite; the command's own output is replaced whole with it.
    ours = tmp_path / "ours"
    ours.mkdir()
    assert run_purify(tiny_folder, tmp_path, src, ours) == 0
    first = snapshot(ours)
    (ours / "1" / "stale.png").write_bytes(b"x")
    assert run_purify(tiny_folder, tmp_path, src, ours) == 2
    assert run_purify(tiny_folder, tmp_path, src, ours, "--overwrite") == 0
    assert snapshot(ours) == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ours")) == []


def test_an_interrupted_folder_write_leaves_the_old_output(tiny_folder, tmp_path, monkeypatch, capsys):
    src = synthetic_npz(tmp_path / "in.npz", n=4)
    out = tmp_path / "out"
    assert run_purify(tiny_folder, tmp_path, src, out) == 0
    first = snapshot(out)
    saves = []

    def failing_save(self, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    original = PIL.Image.Image.save
    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    assert run_purify(tiny_folder, tmp_path, src, out, "--overwrite") == 2
    assert "no space left on the device while writing the output" in capsys.readouterr().err
    assert snapshot(out) == first  # untouched, and no staging folder is left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_folder_output_names_class_folders_by_label(tiny_folder, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "gap.npz", images=images, labels=np.array([0, 2, 0, 2, 2, 0]))
    out = tmp_path / "gap"
    assert run_purify(tiny_folder, tmp_path, tmp_path / "gap.npz", out) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "0/00000.png",
        "0/00002.png",
        "0/00005.png",
        "2/00001.png",
        "2/00003.png",
        "2/00004.png",
    ]
    np.savez(tmp_path / "neg.npz", images=images, labels=np.array([-1, 0, 1, -1, 0, 1]))
    assert run_purify(tiny_folder, tmp_path, tmp_path / "neg.npz", tmp_path / "neg") == 2
    assert "labels must be non-negative; the input has label -1" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_user_errors_are_one_line(tiny_folder, tmp_path, capsys):
    src = synthetic_npz(tmp_path / "in.npz", n=2)
    cases = {
        "device='cuda'": ["purify", str(src), str(tmp_path / "o.npz"), "--device", "cuda"],
        "not a readable .npz": ["purify", str(tmp_path / "junk.npz"), str(tmp_path / "o.npz")],
        "test_batch is not a CIFAR-10 batch file": ["purify", str(tmp_path / "cifar"), str(tmp_path / "o.npz")],
        "has no ['labels']": ["purify", str(tmp_path / "nolabels"), str(tmp_path / "o.npz")],
        "'-' is not an .npz file or a folder name": ["purify", str(src), "-"],
        "o.npy' is not an .npz file or a folder name": ["purify", str(src), str(tmp_path / "o.npy")],
    }
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip")
    for root, payload in (("cifar", b"not a pickle"), ("nolabels", None)):
        folder = tmp_path / root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = payload or __import__("pickle").dumps({b"data": np.zeros((1, 3072), np.uint8)})
            (folder / name).write_bytes(data)
    for match, argv in cases.items():
        argv = ["--no-progress", *argv, *purify_args(tiny_folder, tmp_path), "--split", "test"]
        assert main(argv) == 2, match
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1 and "Traceback" not in err and "allow_pickle" not in err
    assert not (tmp_path / "o.npy").exists() and not Path("-").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--num-images", "0"])
    assert exit_.value.code == 2 and "--num-images: must be a positive int" in capsys.readouterr().err
    # demo --out: a name Pillow cannot write, or a folder, fails before any work and leaves the file alone
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    assert main(["--no-progress", "demo", "--out", str(notes)]) == 2
    assert "does not end in an image format Pillow writes (.md)" in capsys.readouterr().err
    assert main(["--no-progress", "demo", "--out", str(tmp_path)]) == 2
    assert "is a folder; pass a file name in it" in capsys.readouterr().err
    assert notes.read_text() == "mine"


def test_train_overwrite_never_deletes_other_files(tmp_path, monkeypatch, capsys):
    data = synthetic_npz(tmp_path / "d.npz")
    argv = ["--no-progress", "train", "--data", str(data), "--block-out-channels", "8", "16", "--norm-num-groups",
            "4", "--t-max", "20", "--num-train-timesteps", "100", "--batch-size", "4", "--max-steps", "1",
            "--overwrite", "--output-dir"]  # fmt: skip
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    assert main([*argv, str(theirs)]) == 2
    assert "did not write" in capsys.readouterr().err and (theirs / "thesis.tex").is_file()
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "."]) == 2 and main([*argv, str(tmp_path.parent)]) == 2
    assert data.is_file() and (theirs / "thesis.tex").is_file()
    # Its own earlier run is replaced, after the inputs are checked: a bad input leaves it as it was.
    assert main([*argv, "run"]) == 0
    kept = snapshot(tmp_path / "run")
    assert main([*argv[:3], str(tmp_path / "missing.npz"), *argv[4:], "run"]) == 2
    assert snapshot(tmp_path / "run") == kept
    assert main([*argv, "run"]) == 0
