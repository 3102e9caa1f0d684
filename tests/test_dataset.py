from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from eclipse_transforms import EclipsePurify, PurifiedDataset

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
    return CountingPurify(tiny, t_star=10, steps=2, seed=0)


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


def test_second_construction_reads_the_cache(purify, tmp_path):
    build(purify, tmp_path)
    first = CountingPurify.calls
    assert first == 5  # shards of 4, 4 and 2 images, batches of at most 3 within a shard: 2 + 2 + 1
    again = build(purify, tmp_path)
    assert CountingPurify.calls == first, "the second construction ran the denoiser"
    assert len(again) == 10


@pytest.mark.parametrize("change", ["t_star", "seed", "weights", "steps", "data"])
def test_changing_what_matters_rebuilds(purify, tmp_path, change):
    ds = build(purify, tmp_path)
    calls = CountingPurify.calls
    kw = {}
    if change == "t_star":
        purify = CountingPurify(purify.denoiser, t_star=9, steps=2, seed=0)
    elif change == "seed":
        purify = CountingPurify(purify.denoiser, t_star=10, steps=2, seed=1)
    elif change == "steps":
        purify = CountingPurify(purify.denoiser, t_star=10, steps=3, seed=0)
    elif change == "weights":
        purify = CountingPurify(make_tiny_denoiser(seed=1), t_star=10, steps=2, seed=0)
    else:
        kw["dataset"] = ToyDataset(seed=1)
    other = build(purify, tmp_path, **kw)
    assert other.cache_path != ds.cache_path and CountingPurify.calls > calls


def test_cache_is_independent_of_batch_size(purify, tmp_path):
    a = build(purify, tmp_path, cache_dir=tmp_path / "a", batch_size=1)
    b = build(purify, tmp_path, cache_dir=tmp_path / "b", batch_size=7)
    assert shard_hashes(a.cache_path) == shard_hashes(b.cache_path) != {}


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
    assert "ToyDataset (10 items" in r and "t_star=10" in r and "steps=2" in r and "3/3 shards" in r


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
        ([(torch.rand(3, H, W), "cat")], TypeError, "labels must be ints"),
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
