"""The docstrings' examples run: every module of the package, under doctest, with a tiny denoiser at hand."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import eclipse_transforms

from .conftest import make_tiny_denoiser

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
