"""The evaluation bench: poisons (and, later, defenses and the runner). Imports the library, never the reverse."""

from .poisons import get_poison, list_poisons, register_poison

__all__ = ["get_poison", "list_poisons", "register_poison"]
