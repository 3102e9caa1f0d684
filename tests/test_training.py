from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from eclipse_transforms import EclipsePurify, load_denoiser
from eclipse_transforms.training import TrainConfig, train


def synthetic_npz(path: Path, n: int = 8, size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    images = np.clip(base + rng.integers(-20, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 2)
    return path


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    defaults = dict(
        data=str(synthetic_npz(tmp_path / "data.npz")),
        output_dir=str(tmp_path / "out"),
        block_out_channels=(8, 16),
        norm_num_groups=4,
        t_max=20,
        num_train_timesteps=100,
        batch_size=4,
        max_steps=6,
        lr=1e-3,
        warmup_steps=1,
        checkpoint_minutes=0.0,
        dropout=0.1,
    )
    return TrainConfig(**{**defaults, **kw})


def test_training_lowers_the_loss(tmp_path):
    losses = []
    train(
        tiny_config(tmp_path, max_steps=60, batch_size=8, checkpoint_minutes=100),
        progress=False,
        on_step=lambda step, loss: losses.append(loss),
    )
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-15:])


def test_output_loads_through_the_denoiser_loader(tmp_path):
    torch.manual_seed(7)
    callers_state = torch.get_rng_state()
    out = train(tiny_config(tmp_path), progress=False)
    assert torch.equal(torch.get_rng_state(), callers_state)  # seeded inside, without moving the caller's stream
    den = load_denoiser(out)
    assert den.t_max == 20 and den.num_train_timesteps == 100
    assert den.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert json.loads((out / "train_config.json").read_text())["t_max"] == 20
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "6 steps" in card
    y = EclipsePurify(den, recipe="eclipse", t_star=20, steps=2, seed=0, compensation=None)(torch.rand(2, 3, 8, 8))
    assert y.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="above t_max=20"):
        EclipsePurify(den, recipe="eclipse", t_star=21)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / "full")), progress=False)

    def kill(step, loss):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")

    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=kill)
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 3
    resumed = train(cfg, resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(next((full / "checkpoints").glob("step-*")) / name)
        b = load_file(next((resumed / "checkpoints").glob("step-*")) / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert load_denoiser(full).fingerprint == load_denoiser(resumed).fingerprint


def test_resume_extends_max_steps_and_refuses_other_changes(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=3)
    train(cfg, progress=False)
    out = train(tiny_config(tmp_path, max_steps=5), resume=True, progress=False)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 5
    with pytest.raises(ValueError, match=r"differs from the saved one in \['lr'\]"):
        train(tiny_config(tmp_path, max_steps=7, lr=5e-4), resume=True, progress=False)


# -- bad input -----------------------------------------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1)
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        train(cfg, progress=False)
    train(cfg, overwrite=True, progress=False)


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_images(tmp_path, n):
    data = tmp_path / "few.npz"
    np.savez(data, images=np.zeros((n, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2 images"):
        train(tiny_config(tmp_path, data=str(data)), progress=False)


def test_grayscale_images(tmp_path):
    data = tmp_path / "gray.npz"
    np.savez(data, images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        train(tiny_config(tmp_path, data=str(data)), progress=False)


def test_sixteen_bit_image_folder(tmp_path):
    for i in range(2):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        PIL.Image.new("I;16", (8, 8), 300 * i).save(tmp_path / "imgs" / "a" / f"{i}.png")
    with pytest.raises(ValueError, match="more than 8 bits a channel.*scale it to 8 bits first"):
        train(tiny_config(tmp_path, data=str(tmp_path / "imgs")), progress=False)


def test_mixed_image_sizes(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "0.png")
    PIL.Image.new("RGB", (16, 8)).save(tmp_path / "imgs" / "a" / "1.png")
    with pytest.raises(ValueError, match="different sizes"):
        train(tiny_config(tmp_path, data=str(tmp_path / "imgs")), progress=False)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"duplicate": 0}, "duplicate must be >= 1"),
        ({"t_max": 0}, "t_max must be >= 1"),
        ({"t_max": 101}, "t_max must be <= num_train_timesteps=100"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"block_out_channels": (6, 16)}, "multiples of norm_num_groups"),
    ],
)
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, **kw)


def test_config_roundtrip(tmp_path):
    cfg = tiny_config(tmp_path)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_model_card_includes_measured_quality(tmp_path):
    from eclipse_transforms.training.card import QUALITY_NAME, write_model_card

    cfg = tiny_config(tmp_path, max_steps=1)
    out = train(cfg, progress=False)
    rows = [
        {"name": "1 step(s)", "psnr": 37.2, "images_per_s": 120.0},
        {"name": "official", "psnr": None, "images_per_s": 0.09},
    ]
    (out / QUALITY_NAME).write_text(
        json.dumps({"num_images": 10, "t_star": 20, "batch_size": 4, "hardware": "cpu", "rows": rows})
    )
    state = json.loads((out / "train_state.json").read_text())
    card = write_model_card(out, cfg, state, num_images=None).read_text()
    assert "| 1 step(s) | 37.20 | 120.00 |" in card and "| official | - | 0.09 |" in card


def test_64px_end_to_end(tmp_path):
    # Nothing in the trainer or the purifier is tied to 32x32: train on 64x64 images, then purify 64x64 images
    # through the cached dataset with the weights it wrote.
    from torch.utils.data import TensorDataset

    from eclipse_transforms import EclipsePurify, PurifiedDataset

    data = synthetic_npz(tmp_path / "d64.npz", n=6, size=64)
    out = train(tiny_config(tmp_path, data=str(data), max_steps=2), progress=False)
    den = load_denoiser(out)
    assert den.unet.config.sample_size == 64
    images = torch.from_numpy(np.load(data)["images"]).permute(0, 3, 1, 2)
    ds = PurifiedDataset(
        TensorDataset(images, torch.arange(6) % 2),
        EclipsePurify(den, recipe="eclipse", t_star=10, steps=2, seed=0),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    x, label = ds[5]
    assert x.shape == (3, 64, 64) and label == 1 and ds.purified(5).shape == (3, 64, 64)
    assert not torch.equal(ds.purified(5), images[5])
