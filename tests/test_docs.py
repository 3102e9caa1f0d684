"""The documentation runs: the docstrings' examples (every module, under doctest, with a tiny denoiser at hand), and
the Python examples of the README and docs/usage.md, with small stand-ins for the data they take as given."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

import eclipse_transforms

from .conftest import make_tiny_denoiser

ROOT = Path(__file__).resolve().parent.parent

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(eclipse_transforms.__path__, "eclipse_transforms.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for test in finder.find(module, globs={**vars(module), "tiny_denoiser": make_tiny_denoiser()}):
        examples += len(test.examples)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {examples} docstring examples in {name} failed (output above)"


def test_the_public_classes_have_examples_that_run():
    # A public class's example is its first documentation; a skipped one is not a tested one.
    for name in ("EclipsePurify", "ForwardDiffusion", "ReverseDiffusion", "CorruptionCompensation", "Denoiser"):
        doc = getattr(eclipse_transforms, name).__doc__
        example = doc.split("Example:")[1]
        assert ">>>" in example and "+SKIP" not in example, name


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


class _Pairs(Dataset):
    """(PIL image, int label) pairs, like torchvision's CIFAR10 returns them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.targets = [i % 10 for i in range(n)]
        self.classes = [f"class {c}" for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return v2.functional.to_pil_image(self.images[i]), self.targets[i]


@pytest.fixture
def doc_world(tmp_path, monkeypatch):
    """What the documentation's examples take as given: data sets, images, and a cache that is not the user's."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ECLIPSE_TRANSFORMS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        torchvision.datasets, "CIFAR10", lambda root, train=True, **kwargs: _Pairs(24, seed=int(train))
    )
    return {
        "root": str(tmp_path / "cifar10"),
        "my_clean_set": _Pairs(4, seed=2),
        "train_set": _Pairs(12, seed=3),
        "scraped": _Pairs(12, seed=4),
        "augment": v2.RandomHorizontalFlip(),
        "images": torch.rand(3, 3, 32, 32),
    }


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # on a 2-core machine
def test_the_readme_examples_run(doc_world, tmp_path):
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) == 2, "the README's Python examples changed: update this test with them"
    env = dict(doc_world)
    exec(blocks[0], env)
    assert len(env["train"]) == 24 + 5 * 4  # the purified set, then each trusted image five times
    assert (tmp_path / "home" / ".cache" / "eclipse-transforms").is_dir()  # the cache_dir the example names
    images, labels = next(iter(env["loader"]))  # four worker processes, as written
    assert images.shape == (44, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (44,)
    exec(blocks[1], env)
    x = doc_world["images"]
    assert env["purified"].shape == x.shape and not torch.equal(env["purified"], x)
    assert env["paper"].shape == x.shape and not torch.allclose(env["paper"], env["purified"])
    assert env["tf"](v2.functional.to_pil_image(x[0])).shape == (3, 32, 32)


def test_the_usage_examples_run(doc_world):
    blocks = _python_blocks(ROOT / "docs" / "usage.md")
    assert len(blocks) == 3, "docs/usage.md's Python examples changed: update this test with them"
    env = dict(doc_world)
    exec(blocks[0], env)
    out = env["train_transform"](v2.functional.to_pil_image(doc_world["images"][0]))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    exec(blocks[1], env)
    # "EclipsePurify() is the same as" the squeeze spelled out: the same cache entry, the same compensation.
    default = env["PurifiedDataset"](doc_world["train_set"], env["EclipsePurify"](), progress=False)
    assert default.cache_path == env["train"].cache_path
    assert repr(default.compensation) == repr(env["purify"].compensation)
    exec(blocks[2], env)
    assert len(env["train"]) == 12 + 5 * 4
    images, labels = next(iter(env["loader"]))
    assert images.shape == (32, 3, 32, 32) and labels.shape == (32,)
