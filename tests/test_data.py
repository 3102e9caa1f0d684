from __future__ import annotations

import pickle

import numpy as np
import pytest

from eclipse_transforms._data import load_image_set, load_indices

from .conftest import cifar_npz


def make_cifar_root(root, rng, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        images[name] = hwc
        rows = hwc.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # R plane, G plane, B plane: CIFAR's layout
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": list(rng.integers(0, 10, n_per_batch))}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile"]}, f, protocol=2)
    return images


def test_cifar_root_layout(tmp_path, rng):
    images = make_cifar_root(tmp_path, rng)
    train = load_image_set(tmp_path, split="train")
    assert train.images.shape == (20, 3, 32, 32) and train.kind == "cifar"
    assert (train.images[0].permute(1, 2, 0).numpy() == images["data_batch_1"][0]).all()
    test = load_image_set(tmp_path / "cifar-10-batches-py", split="test")
    assert (test.images[3].permute(1, 2, 0).numpy() == images["test_batch"][3]).all()
    assert test.classes == ["airplane", "automobile"]


def test_cifar_batches_cannot_run_code(tmp_path, rng, capsys):
    make_cifar_root(tmp_path, rng)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch file .*refusing to load builtins.print"):
        load_image_set(tmp_path, split="test")
    assert "pwned" not in capsys.readouterr().out


def test_npz_keys_and_layouts(tmp_path, rng):
    chw = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=chw, y=np.arange(3))
    got = load_image_set(tmp_path / "a.npz")
    assert (got.images.numpy() == chw).all() and got.labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "b.npz", other=chw)
    with pytest.raises(ValueError, match="has no image array"):
        load_image_set(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=chw.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_image_set(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", images=chw[:, 0])
    with pytest.raises(ValueError, match=r"grayscale images .*repeat the channel three times"):
        load_image_set(tmp_path / "d.npz")


def test_indices_files(tmp_path):
    (tmp_path / "a.json").write_text('{"indices": [3, 1]}')
    (tmp_path / "b.txt").write_text("5\n6\n")
    np.save(tmp_path / "c.npy", np.array([7]))
    assert load_indices(tmp_path / "a.json") == [3, 1]
    assert load_indices(tmp_path / "b.txt") == [5, 6]
    assert load_indices(tmp_path / "c.npy") == [7]


@pytest.mark.cifar
def test_real_cifar10_npz():
    path = cifar_npz()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set ECLIPSE_CIFAR10 or place ../shared/data/cifar10/cifar10.npz")
    test = load_image_set(path, split="test")
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the canonical start (SOURCE.md)


def test_labels_are_never_truncated(tmp_path, rng):
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "whole.npz", images=images, labels=np.array([0.0, 2.0, 1.0]))
    assert load_image_set(tmp_path / "whole.npz").labels.tolist() == [0, 2, 1]
    np.savez(tmp_path / "frac.npz", images=images, labels=np.array([0.0, 2.7, 1.0]))
    with pytest.raises(ValueError, match="integer class indices.*2.7.*never rounded"):
        load_image_set(tmp_path / "frac.npz")
    np.savez(tmp_path / "short.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"one label per image \(3\)"):
        load_image_set(tmp_path / "short.npz")
    (tmp_path / "f.json").write_text("[1, 2.5]")
    (tmp_path / "g.txt").write_text("1\n2.5\n")
    (tmp_path / "h.json").write_text('{"idx": [1]}')
    for name in ("f.json", "g.txt", "h.json"):
        with pytest.raises(ValueError, match="indices file"):
            load_indices(tmp_path / name)


@pytest.mark.parametrize("content", [b"garbage", b"\x93NUMPY"])
def test_a_file_that_is_not_an_npz(tmp_path, content):
    (tmp_path / "x.npz").write_bytes(content)
    with pytest.raises(ValueError, match="not a readable .npz archive") as e:
        load_image_set(tmp_path / "x.npz")
    assert "allow_pickle" not in str(e.value)
    np.save(tmp_path / "y.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "y.npy").rename(tmp_path / "y.npz")
    with pytest.raises(ValueError, match="single .npy array"):
        load_image_set(tmp_path / "y.npz")


def test_an_image_folder_is_read_as_rgb_like_torchvision_reads_it(tmp_path, rng):
    import PIL.Image
    import torch
    from torchvision.datasets import ImageFolder

    from eclipse_transforms._data import FolderImages

    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    PIL.Image.fromarray(rgb).save(tmp_path / "a" / "rgb.png")
    PIL.Image.fromarray(rgb[..., 0]).save(tmp_path / "a" / "gray.png")
    PIL.Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "b" / "rgba.png")
    PIL.Image.fromarray(rgb).convert("CMYK").save(tmp_path / "b" / "cmyk.tiff")
    PIL.Image.fromarray(rgb).convert("P").save(tmp_path / "b" / "palette.png")
    expected = ImageFolder(tmp_path)  # torchvision's default loader: convert("RGB")
    want = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in expected])
    whole, lazy = load_image_set(tmp_path), FolderImages(tmp_path)
    assert torch.equal(whole.images, want)
    assert torch.equal(torch.stack([lazy[i][0] for i in range(len(lazy))]), want)
    assert whole.labels.tolist() == expected.targets == [lazy[i][1] for i in range(len(lazy))]
    assert torch.equal(whole.images[1, 0], torch.from_numpy(rgb[..., 0]))  # grayscale: R = G = B = its value

    # 1000 would clip to 255; older Pillow reads the file back as mode "I"
    PIL.Image.new("I;16", (8, 8), 1000).save(tmp_path / "b" / "deep.png")
    for read in (lambda: load_image_set(tmp_path), lambda: FolderImages(tmp_path)[3]):
        with pytest.raises(ValueError, match=r"deep\.png is a 'I(;16)?' image \(more than 8 bits a channel\)"):
            read()
