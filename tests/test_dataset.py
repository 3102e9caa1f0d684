from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from eclipse_transforms import Despeckle, EclipsePurify, JPEGCompression, PurifiedDataset, RepairBorder
from eclipse_transforms import functional as EF

from .conftest import H, W, make_tiny_denoiser


class ToyDataset(Dataset):
    classes = ["a", "b", "c"]

    def __init__(self, n: int = 10, seed: int = 0, images=None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = images if images is not None else [torch.rand(3, H, W, generator=g) for _ in range(n)]
        self.labels = [i % 3 for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class CountingPurify(EclipsePurify):
    """EclipsePurify that counts denoiser batches and can fail after a number of them (a simulated kill)."""

    calls = 0
    fail_after: int | None = None

    def purify_batch(self, x, generator=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        type(self).calls += 1
        return super().purify_batch(x, generator)


@pytest.fixture()
def purify(tiny):
    CountingPurify.calls, CountingPurify.fail_after = 0, None
    return CountingPurify(tiny, recipe="eclipse", t_star=10, steps=2, seed=0)


def shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("shard-*.safetensors"))}


def build(purify, tmp_path, **kw):
    kw = {"cache_dir": tmp_path / "cache", "batch_size": 3, "shard_size": 4, "progress": False, **kw}
    return PurifiedDataset(kw.pop("dataset", ToyDataset()), purify, **kw)


def test_items_are_compensated_purified_images(purify, tmp_path):
    ds = build(purify, tmp_path)
    assert len(ds) == 10 and ds.classes == ["a", "b", "c"]
    image, label = ds[4]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, H, W)
    assert label == 1 and 0 <= image.min() and image.max() <= 1
    # The compensation is redrawn on every access; the cached purified image is not.
    assert not torch.equal(ds[4][0], ds[4][0])
    assert torch.equal(ds.purified(4), ds.purified(4)) and ds.purified(4).dtype == torch.uint8
    # Without compensation the item is exactly the cached image.
    purify.compensation = None
    plain = build(purify, tmp_path)
    assert torch.equal(plain[4][0], ds.purified(4).float() / 255)


def test_cache_matches_direct_purification(purify, tmp_path):
    from eclipse_transforms._images import index_generators, quantize

    data = ToyDataset()
    ds = build(purify, tmp_path, dataset=data)
    x = torch.stack(data.images)
    direct = quantize(purify.purify_batch(x, index_generators(range(10), 0)))
    assert torch.equal(torch.stack([ds.purified(i) for i in range(10)]), direct)


def test_the_prefilter_runs_before_the_diffusion_and_is_cached(purify, tmp_path):
    from eclipse_transforms._images import index_generators, quantize

    data = ToyDataset()
    plain = build(purify, tmp_path, dataset=data)
    filtered = CountingPurify(
        purify.denoiser, recipe="eclipse", t_star=10, steps=2, seed=0, prefilter=JPEGCompression(10)
    )
    ds = build(filtered, tmp_path, dataset=data)
    x = torch.stack(data.images)
    expected = quantize(purify.purify_batch(EF.jpeg_compression(x, quality=10), index_generators(range(10), 0)))
    assert torch.equal(torch.stack([ds.purified(i) for i in range(10)]), expected)
    assert not torch.equal(ds.purified(0), plain.purified(0))
    assert "JPEGCompression(quality=10)" in repr(filtered)
    with pytest.raises(TypeError, match="prefilter"):
        EclipsePurify(purify.denoiser, recipe="eclipse", t_star=10, prefilter="jpeg")


class CountingSqueeze:
    """A deterministic one-time stage (repair the border, then JPEG q20) that counts the images it sees."""

    images = 0

    def __call__(self, x):
        type(self).images += len(x)
        return JPEGCompression(20)(RepairBorder()(x))

    def __repr__(self) -> str:
        return "CountingSqueeze()"


def test_without_diffusion_the_one_time_stages_are_cached_and_the_grayscale_redrawn(purify, tmp_path):
    # The defense search's recipe in the dataset's shape: squeeze once (cached), grayscale on every access.
    from eclipse_transforms import CorruptionCompensation

    data = ToyDataset()
    CountingSqueeze.images = 0
    squeeze = CountingPurify(
        purify.denoiser,
        t_star=10,
        steps=2,
        prefilter=CountingSqueeze(),
        diffusion=False,
        compensation=CorruptionCompensation(0.4, sigma=0.0),
        seed=0,
    )
    ds = build(squeeze, tmp_path, dataset=data)
    assert CountingSqueeze.images == 10  # every image squeezed once, in the build
    expected = JPEGCompression(20)(RepairBorder()((torch.stack(data.images) * 255).round().to(torch.uint8)))
    cached = torch.stack([ds.purified(i) for i in range(10)])
    # the same squeeze on the float images the dataset reads, up to the uint8 rounding of the float input
    assert (cached.int() - expected.int()).abs().max() <= 1
    assert not torch.equal(cached, build(purify, tmp_path, dataset=data).purified(0).expand_as(cached))
    torch.manual_seed(0)
    items = torch.stack([ds[i][0] for i in range(10) for _ in range(4)])
    assert CountingSqueeze.images == 10  # reading does not squeeze again
    gray = (items.amax(1) - items.amin(1)).flatten(1).amax(1) == 0
    assert gray.any() and not gray.all()  # p = 0.4, redrawn per access
    colour = torch.stack([ds.purified(i) for i in range(10) for _ in range(4)]).float() / 255
    torch.testing.assert_close(items[~gray], colour[~gray])  # sigma = 0: untouched but for the grayscale
    again = build(squeeze, tmp_path, dataset=data)
    assert CountingSqueeze.images == 10 and again.cache_path == ds.cache_path  # the second construction reads
    with_diffusion = CountingPurify(
        purify.denoiser, recipe="eclipse", prefilter=CountingSqueeze(), seed=0, t_star=10, steps=2
    )
    assert build(with_diffusion, tmp_path, dataset=data).cache_path != ds.cache_path
    assert "diffusion=False" in repr(squeeze)
    with pytest.raises(TypeError, match="diffusion must be True or False"):
        EclipsePurify(purify.denoiser, recipe="eclipse", t_star=10, diffusion="no")


def test_the_squeeze_needs_no_denoiser_and_keys_only_what_changes_its_bytes(tmp_path):
    squeeze = EclipsePurify()
    assert squeeze.denoiser is None  # the bundled weights are not loaded for a recipe that never runs them
    assert len(pickle.dumps(squeeze)) < 100_000  # what a DataLoader worker receives (23 MB with the UNet)
    with pytest.raises(ValueError, match="no denoiser; EclipsePurify\\(recipe='eclipse'\\).forward_diffusion"):
        _ = squeeze.forward_diffusion
    # Any image size: the UNet's multiple of 4 does not apply where no UNet runs (30 is not a multiple of 4).
    odd = ToyDataset(images=[torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    ds = build(squeeze, tmp_path, dataset=odd)
    assert ds.purified(0).shape == (3, 30, 30)
    # The squeeze works image by image on the CPU: the batch size does not change its bytes, nor its key.
    assert build(squeeze, tmp_path, dataset=odd, batch_size=2).cache_path == ds.cache_path
    gray = ToyDataset(images=[torch.rand(1, H, W) for _ in range(4)])
    with pytest.raises(ValueError, match=r"RGB images .* make grayscale images RGB first \(v2.RGB\(\)\)"):
        build(squeeze, tmp_path, dataset=gray)


def test_trusted_images_skip_the_purification_and_get_the_same_per_epoch_path(tmp_path):
    # with_trusted: the purified items, then the trusted ones, those not squeezed but grayscaled (p = 0.4, redrawn
    # per access) and transformed like the others; bad trusted sets are refused with the fix.
    from eclipse_transforms import CorruptionCompensation

    CountingSqueeze.images = 0
    squeeze = EclipsePurify(prefilter=CountingSqueeze(), compensation=CorruptionCompensation(0.4, sigma=0.0), seed=0)
    ds = build(squeeze, tmp_path, transform=v2.RandomHorizontalFlip(p=1.0), target_transform=lambda y: y + 10)
    trusted = ToyDataset(n=6, seed=1)
    train = ds.with_trusted(trusted)
    assert len(train) == 16 and CountingSqueeze.images == 10  # the trusted images are not squeezed
    torch.manual_seed(0)
    items = [train[10 + i % 6] for i in range(24)]
    assert CountingSqueeze.images == 10
    images = torch.stack([x for x, _ in items])
    gray = (images.amax(1) - images.amin(1)).flatten(1).amax(1) == 0
    assert gray.any() and not gray.all()  # the purified items' compensation, redrawn per access
    flipped = torch.stack([trusted.images[i % 6].flip(-1) for i in range(24)])
    torch.testing.assert_close(images[~gray], flipped[~gray])  # as they are, then the transform
    assert [y for _, y in items] == [trusted.labels[i % 6] + 10 for i in range(24)]
    assert isinstance(items[0][0], tv_tensors.Image) and train[0][1] == 10  # the purified items are unchanged
    assert train[-1][1] == trusted.labels[-1] + 10
    uint8 = ToyDataset(images=[(x * 255).round().to(torch.uint8) for x in trusted.images])
    assert ds.with_trusted(uint8)[10][0].dtype == torch.float32
    five = ds.with_trusted(trusted, repeat=5)
    assert len(five) == 10 + 30 and five[10 + 6 * 4 + 1][1] == trusted.labels[1] + 10
    assert five.classes == ["a", "b", "c"] and five.cache_path == ds.cache_path  # as the purified dataset's
    assert repr(five).startswith(repr(ds)) and repr(five).endswith(
        "+ trusted: ToyDataset (6 items, not purified, 5 times an epoch)"
    )
    plain = build(squeeze, tmp_path).with_trusted(trusted)  # no lambdas: picklable, for DataLoader workers
    assert pickle.loads(pickle.dumps(plain))[-1][1] == trusted.labels[-1]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = five.nothing
    with pytest.raises(ValueError, match="repeat must be a positive int, got 0"):
        ds.with_trusted(trusted, repeat=0)
    with pytest.raises(
        ValueError, match=r"trusted image 0 has shape \(3, 8, 8\); the purified images are .*v2.Resize"
    ):
        ds.with_trusted(ToyDataset(images=[torch.rand(3, 8, 8)]))
    with pytest.raises(ValueError, match="trusted dataset is empty"):
        ds.with_trusted(ToyDataset(images=[]))
    with pytest.raises(TypeError, match="trusted dataset must be a map-style dataset"):
        ds.with_trusted(iter([]))
    # The same class name under another label (an ImageFolder without one of the class folders) is refused;
    # names the purified dataset does not have, or a dataset without class names, cannot be compared.
    shifted = ToyDataset(n=2, seed=1)
    shifted.classes = ["a", "c"]
    with pytest.raises(ValueError, match="class 'c' is label 1 in the trusted dataset and 2 in the purified one"):
        ds.with_trusted(shifted)
    shifted.class_to_idx = {"a": 0, "c": 2}  # torchvision's ImageFolder has both; class_to_idx is what counts
    assert len(ds.with_trusted(shifted)) == 12
    shifted.class_to_idx = {"A": 0, "C": 1}
    assert len(ds.with_trusted(shifted)) == 12
    with pytest.raises(ValueError, match="trusted image 0 must be an RGB PIL image"):
        from PIL import Image

        ds.with_trusted([(Image.new("L", (W, H)), 0)])


def test_a_trusted_image_folder_without_one_of_the_classes_is_refused(tmp_path):
    # The mistake the class-numbering check is for: ImageFolder numbers the class folders it finds, so a small
    # checked set that lacks 'b' calls 'c' label 1, and its 'c' images would train as 'b'.
    from PIL import Image
    from torchvision.datasets import ImageFolder

    def folder(root, classes):
        for c in classes:
            (root / c).mkdir(parents=True)
            Image.new("RGB", (W, H), (40 * len(c), 90, 160)).save(root / c / "0.png")
        return ImageFolder(str(root))

    ds = build(EclipsePurify(), tmp_path, dataset=folder(tmp_path / "scraped", ["a", "b", "c"]))
    checked = folder(tmp_path / "checked", ["a", "c"])
    with pytest.raises(ValueError, match="class 'c' is label 1 in the trusted dataset and 2 in the purified one"):
        ds.with_trusted(checked)
    with pytest.raises(ValueError, match="class 'c' is label 1 in the trusted dataset"):  # a split of it, too
        ds.with_trusted(torch.utils.data.Subset(checked, [1]))
    assert ds.with_trusted(folder(tmp_path / "checked-all", ["a", "b", "c"]))[3][1] == 0


def test_second_construction_reads_the_cache(purify, tmp_path):
    build(purify, tmp_path)
    first = CountingPurify.calls
    assert first == 5  # shards of 4, 4 and 2 images, batches of at most 3 within a shard: 2 + 2 + 1
    again = build(purify, tmp_path)
    assert CountingPurify.calls == first, "the second construction ran the denoiser"
    assert len(again) == 10


@pytest.mark.parametrize("change", ["t_star", "seed", "weights", "steps", "data", "prefilter", "prefilter setting"])
def test_changing_what_matters_rebuilds(purify, tmp_path, change):
    ds = build(purify, tmp_path)
    calls = CountingPurify.calls
    kw = {}
    if change == "t_star":
        purify = CountingPurify(purify.denoiser, recipe="eclipse", t_star=9, steps=2, seed=0)
    elif change == "seed":
        purify = CountingPurify(purify.denoiser, recipe="eclipse", t_star=10, steps=2, seed=1)
    elif change == "steps":
        purify = CountingPurify(purify.denoiser, recipe="eclipse", t_star=10, steps=3, seed=0)
    elif change == "weights":
        purify = CountingPurify(make_tiny_denoiser(seed=1), recipe="eclipse", t_star=10, steps=2, seed=0)
    elif change == "prefilter":
        purify = CountingPurify(purify.denoiser, recipe="eclipse", t_star=10, steps=2, seed=0, prefilter=Despeckle())
    elif change == "prefilter setting":
        first = CountingPurify(
            purify.denoiser, recipe="eclipse", t_star=10, steps=2, seed=0, prefilter=JPEGCompression(10)
        )
        ds = build(first, tmp_path)
        calls = CountingPurify.calls
        purify = CountingPurify(
            purify.denoiser, recipe="eclipse", t_star=10, steps=2, seed=0, prefilter=JPEGCompression(20)
        )
    else:
        kw["dataset"] = ToyDataset(seed=1)
    other = build(purify, tmp_path, **kw)
    assert other.cache_path != ds.cache_path and CountingPurify.calls > calls


@pytest.mark.parametrize("batch_size", [1, 5, 7])
def test_batch_size_is_keyed_and_each_build_reproducible(purify, tmp_path, batch_size):
    # The UNet's rounding depends on the batch's shape (sizes 1, 5 and 7 moved pixels by one level against 32 on
    # CIFAR-10), so each batch size has its own entry, and rebuilding one gives the same bytes.
    odd = build(purify, tmp_path, batch_size=batch_size)
    fresh = pickle.loads(pickle.dumps(odd))  # a DataLoader worker's copy: no shard loaded yet
    other = build(purify, tmp_path, batch_size=4)
    assert odd.cache_path != other.cache_path
    again = build(purify, tmp_path, cache_dir=tmp_path / "again", batch_size=batch_size)
    assert shard_hashes(again.cache_path) == shard_hashes(odd.cache_path) != {}
    # The other builder did not touch this entry: its readers still verify every shard.
    assert torch.equal(
        torch.stack([fresh.purified(i) for i in range(10)]), torch.stack([odd.purified(i) for i in range(10)])
    )


def test_kill_and_resume_gives_identical_shards(purify, tmp_path):
    reference = build(purify, tmp_path, cache_dir=tmp_path / "reference")
    CountingPurify.calls, CountingPurify.fail_after = 0, 3  # dies inside the second shard
    with pytest.raises(KeyboardInterrupt):
        build(purify, tmp_path, cache_dir=tmp_path / "resumed")
    partial = tmp_path / "resumed" / reference.cache_path.name
    assert len(shard_hashes(partial)) == 1
    CountingPurify.calls, CountingPurify.fail_after = 0, None
    resumed = build(purify, tmp_path, cache_dir=tmp_path / "resumed")
    assert CountingPurify.calls == 3  # only the second and third shards were built: 2 + 1 batches
    assert shard_hashes(resumed.cache_path) == shard_hashes(reference.cache_path)
    assert not list(partial.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_damaged_shard_is_rebuilt_never_returned(purify, tmp_path, damage):
    ds = build(purify, tmp_path)
    good = shard_hashes(ds.cache_path)
    expected = torch.stack([ds.purified(i) for i in range(10)])
    shard = ds.cache_path / "shard-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "alter":
        shard.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        shard.unlink()
    calls = CountingPurify.calls
    again = build(purify, tmp_path)
    assert CountingPurify.calls == calls + 2  # one shard of 4 images, batches of 3
    assert shard_hashes(again.cache_path) == good
    assert torch.equal(torch.stack([again.purified(i) for i in range(10)]), expected)


def test_shard_altered_after_construction_is_refused(purify, tmp_path):
    ds = build(purify, tmp_path)
    fresh = pickle.loads(pickle.dumps(ds))  # nothing loaded yet
    shard = ds.cache_path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="changed on disk"):
        fresh[0]


def test_dataloader_with_workers_and_transform(purify, tmp_path):
    ds = build(purify, tmp_path, transform=v2.Compose([v2.RandomCrop((H, W), padding=2), v2.RandomHorizontalFlip()]))
    state = pickle.dumps(ds)
    assert len(state) < 200_000, "the dataset pickles its denoiser or shards into workers"
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    epoch1 = torch.cat([x for x, _ in loader])
    epoch2 = torch.cat([x for x, _ in loader])
    assert epoch1.shape == (10, 3, H, W)
    assert not torch.equal(epoch1, epoch2)


def test_repr_is_informative(purify, tmp_path):
    r = repr(build(purify, tmp_path))
    assert "ToyDataset (10 items" in r and "diffusion (t_star=10, steps=2, seed=0)" in r and "3/3 shards" in r
    squeezed = repr(build(EclipsePurify(), tmp_path))  # the default: the squeeze, no diffusion to speak of
    assert "purified once: Compose(" in squeezed and "JPEGCompression(quality=20)" in squeezed
    assert "t_star" not in squeezed and "sigma=0.0" in squeezed


def test_uint8_and_pil_sources(purify, tmp_path):
    imgs = [(torch.rand(3, H, W) * 255).to(torch.uint8) for _ in range(5)]
    ds = build(purify, tmp_path, dataset=ToyDataset(images=imgs))
    pil = build(purify, tmp_path, dataset=ToyDataset(images=[v2.functional.to_pil_image(i) for i in imgs]))
    assert ds.cache_path == pil.cache_path  # same pixels, same fingerprint
    assert ds[0][0].shape == (3, H, W)


# -- bad input: a clear error, and nothing written to the cache --------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "error", "match"),
    [
        (ToyDataset(images=[]), ValueError, "dataset is empty"),
        (ToyDataset(images=[torch.rand(3, H, W) * 255]), ValueError, r"\[0, 1\]"),
        (ToyDataset(images=[torch.rand(3, H, W), torch.rand(3, H + 2, W)]), ValueError, "one shape"),
        (ToyDataset(images=[torch.rand(1, H, W)]), ValueError, "3 channels"),
        (ToyDataset(images=[torch.full((3, H, W), float("nan"))]), ValueError, "NaN"),
        (ToyDataset(images=[torch.rand(3, 11, 7)]), ValueError, "multiples of 2"),
        ([torch.rand(3, H, W)], TypeError, r"\(image, label\) pairs"),
        ([(torch.rand(3, H, W), 0, 0)], TypeError, "item 0 is a tuple of length 3"),
        (
            [{"img": torch.rand(3, H, W), "label": 0}],
            TypeError,
            r"item 0 is a dict with keys 'img', 'label'; wrap the dataset so that it returns \(row\[image key\]",
        ),
        ([(torch.rand(3, H, W), "cat")], TypeError, "must be an integer class index"),
        ([(torch.rand(3, H, W), 2.7)], TypeError, "never rounded or truncated"),
        ([(torch.rand(3, H, W), True)], TypeError, "got the bool"),
    ],
)
def test_bad_datasets(purify, tmp_path, dataset, error, match):
    with pytest.raises(error, match=match):
        build(purify, tmp_path, dataset=dataset)
    assert not (tmp_path / "cache").exists()


def test_cache_dir_not_writable(purify, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cache_dir=.*is not writable"):
        build(purify, tmp_path, cache_dir=blocker / "cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_cache_dir_read_only(purify, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ValueError, match="is not writable"):
        build(purify, tmp_path, cache_dir=ro)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"batch_size": 0}, "batch_size must be a positive int"), ({"shard_size": -1}, "shard_size must be")],
)
def test_bad_arguments(purify, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        build(purify, tmp_path, **kw)
    with pytest.raises(TypeError, match="purify must be an EclipsePurify"):
        PurifiedDataset(ToyDataset(), v2.RandomGrayscale(), cache_dir=tmp_path)


def test_compensation_matches_the_transform_under_a_seed(purify, tmp_path):
    ds = build(purify, tmp_path)
    torch.manual_seed(5)
    got = ds[3][0]
    torch.manual_seed(5)
    expected = purify.compensation(tv_tensors.Image(ds.purified(3).float() / 255))
    assert torch.equal(got, expected)


def test_a_build_without_progress_bars_logs_each_shard(purify, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="eclipse_transforms.dataset"):
        build(purify, tmp_path)  # 10 images in shards of 4
    shards = [r.getMessage() for r in caplog.records if r.getMessage().startswith("purified shard")]
    assert [m.split(" images/s")[0].rsplit(",", 1)[0] for m in shards] == [
        "purified shard 1 of 3 (4 of 10 images",
        "purified shard 2 of 3 (8 of 10 images",
        "purified shard 3 of 3 (10 of 10 images",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eclipse_transforms.dataset"):
        build(purify, tmp_path, progress=True)  # cached now; and with a bar nothing is logged per shard
    assert not [r for r in caplog.records if r.getMessage().startswith("purified shard")]


# -- what a hostile-user probe found: indices, manifests, arguments, random sources, leftovers -------------------


def test_tensor_and_numpy_indices(purify, tmp_path):
    ds = build(purify, tmp_path)
    expected = [ds.purified(i) for i in range(10)]
    assert torch.equal(ds.purified(torch.tensor(3)), expected[3])
    assert torch.equal(ds.purified(np.int64(-1)), expected[9])
    for i in torch.randperm(10):
        assert torch.equal(ds.purified(i), expected[int(i)]) and ds[i][1] == ds.labels[int(i)]
    subset = Subset(ds, torch.randperm(10)[:6])
    assert len(torch.cat([x for x, _ in DataLoader(subset, batch_size=4)])) == 6
    for bad in (1.0, True, torch.tensor(1.5), "3"):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]


@pytest.mark.parametrize(
    "manifest",
    [b"\xff\xfe not utf-8", b'{"meta": 1, "shards": null}', b"[1, 2]", None, "list", "null-shards", "bad-keys"],
)
def test_an_unparseable_manifest_is_rebuilt(purify, tmp_path, manifest):
    ds = build(purify, tmp_path)
    good = shard_hashes(ds.cache_path)
    path = ds.cache_path / "manifest.json"
    saved = json.loads(path.read_text())
    if manifest is None:
        manifest = b""
    elif manifest in ("list", "null-shards", "bad-keys"):
        saved["shards"] = {"list": list(saved["shards"].values()), "null-shards": None}.get(
            manifest, {"x": "y", "0": 5}
        )
        manifest = json.dumps(saved).encode()
    path.write_bytes(manifest)
    calls = CountingPurify.calls
    again = build(purify, tmp_path)  # rebuilt, not a crash
    assert CountingPurify.calls > calls and shard_hashes(again.cache_path) == good
    assert build(purify, tmp_path).cache_path == again.cache_path


def test_arguments_are_checked_like_the_transforms(purify, tmp_path):
    with pytest.raises(TypeError, match="seed must be an int or None"):
        build(purify, tmp_path, seed="abc")
    with pytest.raises(ValueError, match="cache_dir is an empty path"):
        build(purify, tmp_path, cache_dir="")
    with pytest.raises(TypeError, match="transform must be callable"):
        build(purify, tmp_path, transform="RandomCrop")
    with pytest.raises(TypeError, match="map-style dataset"):
        build(purify, tmp_path, dataset=iter([(torch.rand(3, H, W), 0)]))
    with pytest.raises(ValueError, match="has no usable cuda device|only .* cuda devices"):
        build(purify, tmp_path, device="cuda:99")
    # numpy integers are ints, and a numpy seed is the same seed (seeds are hashed through repr).
    a = build(purify, tmp_path, seed=np.int64(3), batch_size=np.int64(3), shard_size=np.int32(4))
    assert a.cache_path == build(purify, tmp_path, seed=3).cache_path


class RandomlyTransformed(ToyDataset):
    def __init__(self, transform) -> None:
        super().__init__()
        self.transform = transform

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return self.transform(image), label


def test_a_randomly_transformed_source_is_refused(purify, tmp_path):
    with pytest.raises(ValueError, match="different image for item 0 when read again.*PurifiedDataset"):
        build(purify, tmp_path, dataset=RandomlyTransformed(v2.RandomCrop((H, W), padding=2)))
    with pytest.raises(ValueError, match="when read again"):
        build(purify, tmp_path, dataset=RandomlyTransformed(v2.RandomHorizontalFlip()))
    assert not (tmp_path / "cache").exists()
    # A deterministic transform in the wrapped dataset is fine.
    build(purify, tmp_path, dataset=RandomlyTransformed(v2.Grayscale(3)))


def test_a_killed_build_leaves_no_temporary_files(purify, tmp_path):
    ds = build(purify, tmp_path)
    stale = [ds.cache_path / ".shard-00001.safetensors.k1ll3d.tmp", ds.cache_path / ".manifest.json.x9.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (ds.cache_path / "shard-00001.safetensors").unlink()  # as a kill inside that shard's write leaves it
    build(purify, tmp_path)
    assert not any(p.exists() for p in stale)
    # Leftovers beside a complete cache go too, and nothing else is touched.
    stale[0].write_bytes(b"\0")
    before = shard_hashes(ds.cache_path)
    calls = CountingPurify.calls
    build(purify, tmp_path)
    assert not stale[0].exists() and CountingPurify.calls == calls and shard_hashes(ds.cache_path) == before


def test_a_second_builder_waits_for_the_first(purify, tmp_path, caplog):
    ds = build(purify, tmp_path)
    good = shard_hashes(ds.cache_path)
    (ds.cache_path / "shard-00002.safetensors").unlink()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(ds.cache_path / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="eclipse_transforms._cache"):
        again = build(purify, tmp_path)
    holder.wait()
    assert time.monotonic() - start > 0.5 and "another process is building" in caplog.text
    assert shard_hashes(again.cache_path) == good


HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(1.5)
"""


def test_a_full_disk_names_the_cache(purify, tmp_path, monkeypatch):
    import eclipse_transforms._cache as cache

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "atomic_write", full)
    with pytest.raises(OSError, match="no space left on the device while writing shard 0 of the cache"):
        build(purify, tmp_path)


class PidLoggingDataset(ToyDataset):
    """Appends the reading process's pid to ``log`` on every read."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    def __getitem__(self, i: int):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().__getitem__(i)


def test_workers_read_the_source_and_change_nothing(purify, tmp_path):
    serial = build(purify, tmp_path, cache_dir=tmp_path / "serial")
    log = tmp_path / "reads.log"
    parallel = build(purify, tmp_path, cache_dir=tmp_path / "workers", dataset=PidLoggingDataset(log), num_workers=2)
    assert parallel.cache_path.name == serial.cache_path.name
    assert shard_hashes(parallel.cache_path) == shard_hashes(serial.cache_path)
    reads = log.read_text().split()
    # The scan and the build read every item in workers; this process only re-reads the first 8 items twice,
    # the check for a random source.
    assert reads.count(str(os.getpid())) == 16 and len(reads) - 16 == 20
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        build(purify, tmp_path, num_workers=-1)
