"""The public toolbox (``eclipse_transforms.utils``) and the rule that the bench and the scripts use only it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import eclipse_transforms
from eclipse_transforms import utils

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(eclipse_transforms.__file__).parent


def test_digests_follow_the_bytes(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert utils.array_digest(a) == utils.array_digest(torch.from_numpy(a)) == utils.array_digest(a.T.copy().T)
    assert utils.array_digest(a) != utils.array_digest(a + 1)
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (3 << 20))  # several read blocks
    full = utils.file_digest(path)
    assert len(full) == 64 and utils.file_digest(path, 16) == full[:16]
    path.write_bytes(b"x" * (3 << 20) + b"y")
    assert utils.file_digest(path) != full


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.json"
    utils.atomic_write_json(path, {"a": 1})

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        utils.atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_keeps_global_rng_restores_the_callers_stream():
    @utils.keeps_global_rng
    def seeds_and_draws():
        torch.manual_seed(0)
        return torch.rand(1)

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeds_and_draws()
    assert torch.equal(torch.rand(3), expected)


def _private_imports(path: Path) -> list[str]:
    """``file:line`` of every import of a private name of the library (its ``_`` modules or names) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = ("." * node.level) + (node.module or "")
            parts = module.lstrip(".").split(".")
            names = [alias.name for alias in node.names if not alias.name.startswith("__")]  # __version__ is public
            if node.level == 0 and parts[0] != "eclipse_transforms":
                continue
            if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                found.append(f"{path.name}:{node.lineno} {module} {names}")
    return found


def test_the_bench_and_the_scripts_import_only_public_names():
    files = [
        p
        for folder in (PACKAGE / "bench", REPO / "examples", REPO / "benchmarks")
        for p in sorted(folder.glob("*.py"))
    ]
    assert len(files) > 10
    offenders = [hit for path in files if path.name != "__init__.py" for hit in _private_imports(path)]
    assert offenders == [], "use eclipse_transforms.utils (or make the name public):\n" + "\n".join(offenders)


def test_portable_path_never_records_this_machines_absolute_path(tmp_path, monkeypatch):
    repo = tmp_path / "work" / "repo"
    inside = repo / "weights" / "w.json"
    beside = tmp_path / "work" / "shared" / "data.npz"  # a sibling of the repository: one ".."
    far = tmp_path / "mnt" / "data.npz"  # anywhere else: only its name
    assert utils.portable_path(inside, repo) == "weights/w.json"
    assert utils.portable_path(beside, repo) == "../shared/data.npz"
    assert utils.portable_path(far, repo) == "data.npz"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # default root: the working directory
    assert utils.portable_path(inside) == "repo/weights/w.json"
    assert not any(Path(utils.portable_path(p, repo)).is_absolute() for p in (inside, beside, far))
