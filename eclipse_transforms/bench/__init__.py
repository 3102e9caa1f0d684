"""The evaluation bench: poisons, defenses, the classifier recipe and the runner. Imports the library, never the reverse.

>>> from eclipse_transforms.bench import BenchConfig, run_bench
>>> results = run_bench(BenchConfig(data="cifar10.npz", poisons="lsp,ar", tier="quick"))  # doctest: +SKIP
"""

from . import adp, em, rem, sep, tap  # noqa: F401 - registers the model-based poisons
from .classifier import Recipe, train_classifier
from .defenses import Defense, get_defense, list_defenses, register_defense
from .poisons import get_poison, list_poisons, register_poison
from .runner import TIERS, BenchConfig, run_bench

__all__ = [
    "BenchConfig",
    "Defense",
    "Recipe",
    "TIERS",
    "get_defense",
    "get_poison",
    "list_defenses",
    "list_poisons",
    "register_defense",
    "register_poison",
    "run_bench",
    "train_classifier",
]
