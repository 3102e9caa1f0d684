"""A purified cache built by two CPU ranks (gloo) is byte-identical to a one-process build, and both ranks work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eclipse_transforms import EclipsePurify, PurifiedDataset, load_denoiser

from .test_cli import eclipse_args
from .test_dataset import ToyDataset, shard_hashes
from .test_training import synthetic_npz

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")


class RecordingPurify(EclipsePurify):
    """Writes the first index of every batch it purifies to ``log``, so the test sees which rank did what."""

    log: Path | None = None

    def purify_batch(self, x, generator=None):
        with open(self.log, "a") as f:
            f.write(f"{len(x)}\n")
        return super().purify_batch(x, generator)


def build(folder: Path, cache: Path, log: Path | None = None) -> PurifiedDataset:
    purify = RecordingPurify(load_denoiser(folder), recipe="eclipse", t_star=10, steps=2, seed=0, compensation=None)
    purify.log = log or cache.parent / "single.log"
    return PurifiedDataset(ToyDataset(n=22), purify, cache_dir=cache, batch_size=3, shard_size=4, progress=False)


def _rank(rank: int, world_size: int, init_file: str, folder: str, cache: str, logs: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ds = build(Path(folder), Path(cache), Path(logs) / f"rank{rank}.log")
        images = torch.stack([ds.purified(i) for i in range(len(ds))])
        (Path(logs) / f"rank{rank}.json").write_text(json.dumps({"sum": int(images.sum()), "len": len(ds)}))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, folder: Path, cache: Path, world_size: int = 2) -> list[int]:
    """Build with ``world_size`` spawned ranks; return how many images each rank purified."""
    logs = tmp_path / f"logs-{len(list(tmp_path.glob('logs-*')))}"
    logs.mkdir()
    init_file = logs / "init"
    # spawn, not fork: a forked child inherits the parent's OpenMP pool and can hang in its first convolution
    mp.spawn(_rank, args=(world_size, str(init_file), str(folder), str(cache), str(logs)), nprocs=world_size)
    views = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert all(v == views[0] for v in views), "the ranks returned different datasets"
    return [
        sum(int(n) for n in (logs / f"rank{r}.log").read_text().split()) if (logs / f"rank{r}.log").exists() else 0
        for r in range(world_size)
    ]


def test_two_ranks_finish_a_build_with_the_bytes_of_one(tiny_folder, tmp_path):
    # One spawn of two ranks (each imports torch and diffusers: seconds) covers both a partial and a fresh build:
    # the ranks see an entry whose shards 1, 4 and 5 are missing, as a build killed at any point leaves it.
    reference = build(tiny_folder, tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    entry = tmp_path / "resumed" / reference.cache_path.name
    for shard in ("shard-00001.safetensors", "shard-00004.safetensors", "shard-00005.safetensors"):
        (entry / shard).unlink()  # as a build killed before these shards leaves the entry
    (entry / ".shard-00004.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 100)
    work = run_ranks(tmp_path, tiny_folder, tmp_path / "resumed")
    assert sum(work) == 4 + 4 + 2 and min(work) > 0, f"images purified per rank: {work}"
    assert shard_hashes(entry) == shard_hashes(reference.cache_path)
    assert not list(entry.glob("*.tmp"))


class FailingPurify(RecordingPurify):
    """Rank 1 dies in its second batch (a lost node, an out-of-memory error)."""

    def purify_batch(self, x, generator=None):
        if dist.get_rank() == 1 and self.log.exists():
            raise RuntimeError("rank 1 lost its device")
        return super().purify_batch(x, generator)


def _failing_rank(rank: int, world_size: int, init_file: str, folder: str, cache: str, logs: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        purify = FailingPurify(load_denoiser(folder), recipe="eclipse", t_star=10, steps=2, seed=0, compensation=None)
        purify.log = Path(logs) / f"rank{rank}.log"
        PurifiedDataset(ToyDataset(n=22), purify, cache_dir=cache, batch_size=3, shard_size=4, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks, one of which fails: about 15 s
def test_a_failing_rank_fails_the_job_and_a_rerun_finishes_the_same_bytes(tiny_folder, tmp_path):
    reference = build(tiny_folder, tmp_path / "one")
    logs = tmp_path / "logs"
    logs.mkdir()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 lost its device"):
        args = (2, str(logs / "init"), str(tiny_folder), str(tmp_path / "two"), str(logs))
        mp.spawn(_failing_rank, args=args, nprocs=2)
    entry = tmp_path / "two" / reference.cache_path.name
    written = shard_hashes(entry)
    assert len(written) < 6, "the failed build left a complete entry"
    assert all(
        written[name] == digest for name, digest in shard_hashes(reference.cache_path).items() if name in written
    )
    again = build(tiny_folder, tmp_path / "two")  # one process, any number of ranks: the rest is built
    assert shard_hashes(again.cache_path) == shard_hashes(reference.cache_path)


@pytest.mark.slow  # two fresh processes import torch and diffusers: about 20 s
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed")  # fmt: skip
def test_cli_under_torchrun_writes_the_same_file(tiny_folder, tmp_path):
    src = synthetic_npz(tmp_path / "in.npz", n=12)
    args = [*eclipse_args(tiny_folder), "--batch-size", "4"]
    cli = Path(sys.executable).with_name("eclipse-transforms")
    one = subprocess.run(
        [str(cli), "--no-progress", "purify", str(src), str(tmp_path / "one.npz"), *args,
         "--cache-dir", str(tmp_path / "cache-one")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2", "--no-python", str(cli),
         "--no-progress", "-v", "purify", str(src), str(tmp_path / "two.npz"), *args,
         "--cache-dir", str(tmp_path / "cache-two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2 builds shards" in two.stderr and "rank 1 of 2 builds shards" in two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 writes the output
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def _train_rank(rank: int, world_size: int, init_file: str, config: dict) -> None:
    from eclipse_transforms.training import TrainConfig, train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        train(TrainConfig(**config), progress=False)
    finally:
        dist.destroy_process_group()


def test_a_ddp_step_is_the_step_on_the_whole_batch(tmp_path):
    from safetensors.torch import load_file

    from eclipse_transforms.training import train

    from .test_training import tiny_config

    # dropout off: each rank draws its own masks, the one thing a rank's half-batch cannot reproduce
    one = tiny_config(tmp_path, output_dir=str(tmp_path / "one"), dropout=0.0, max_steps=1, batch_size=4)
    train(one, progress=False)
    two = {**one.to_dict(), "output_dir": str(tmp_path / "two")}
    two = {k: tuple(v) if isinstance(v, list) else v for k, v in two.items()}
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), two), nprocs=2)
    # DDP's averaged gradient equals the whole batch's to rounding (about 1e-8 here). Adam divides each gradient by
    # its own size, so where a gradient is itself at rounding level (a few weights in 10,000: the attention's key
    # bias has a true gradient of 0) rounding picks the sign of a step of size up to lr. So: every weight within
    # one Adam step, and all but those few equal to rounding.
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step-0000001" / name)
        b = load_file(tmp_path / "two" / "checkpoints" / "step-0000001" / name)
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() <= 2 * one.lr, f"{name}: DDP differs from one process by {diff.max()}"
        assert (diff > 1e-6).float().mean() < 1e-3, f"{name}: {(diff > 1e-6).sum()} of {len(diff)} weights differ"
    # ...and the steps did move the weights, so agreeing is not trivial.
    from eclipse_transforms.training.trainer import build_unet

    torch.manual_seed(one.seed)
    initial = build_unet(one, 8).state_dict()
    trained = load_file(tmp_path / "two" / "checkpoints" / "step-0000001" / "model.safetensors")
    assert max((initial[k] - trained[k]).abs().max().item() for k in trained) > 100 * 1e-5
