"""Poison specs: the ``--poisons`` grammar, ``name[setting=value,...]``, and the settings a spec stands for.

A spec names a registered poison and, in brackets, changes to its settings: a model-free poison's keyword
arguments (``urp[epsilon=16/255]``) or the fields of a model-based poison's crafting config
(``rem[train_steps=2000]``, nested as ``adp[em.pgd_steps=10]``). :func:`parse_poison` puts a spec in canonical
form (lower case, keys sorted, settings equal to their default dropped), which names the bench's column;
:func:`poison_settings` gives the settings the poison is really crafted with, which the runner's cache and cell
keys are made of, so a change of defaults keeps every result whose real settings did not change.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .poisons import get_poison, list_poisons

__all__ = ["is_model_based", "parse_poison", "poison_call_options", "poison_settings", "split_poisons"]


def split_poisons(text: str) -> list[str]:
    """Split ``"lsp,rem[train_steps=1000,adversary_radius=0]"`` at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1) or (i == len(text) and depth):
            raise ValueError(f"poisons: unbalanced brackets in {text!r}; write e.g. 'rem[train_steps=1000]'.")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def _parse_value(poison: str, key: str, text: str, default: Any) -> Any:
    """``text`` as the type of ``default``: bools as true/false, ints, floats (``4/255`` allowed), strings as given
    (e.g. ADP's ``dtype=bfloat16``; the config checks them)."""
    if isinstance(default, str):
        return text
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            num, _, den = text.partition("/")
            return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        kind = "true or false" if isinstance(default, bool) else type(default).__name__
        raise ValueError(f"poisons: {poison}[{key}={text}]: expected {kind} (default {default!r}).") from None
    raise ValueError(f"poisons: {poison}[{key}=...]: only number, true/false and text settings can be set in a spec.")


def _crafting_config(poison: str) -> Any:
    """A model-based poison's default crafting config (the dataclass default of its ``config``), else None."""
    param = inspect.signature(get_poison(poison)).parameters.get("config")
    return param.default if param is not None and dataclasses.is_dataclass(param.default) else None


def is_model_based(poison: str) -> bool:
    """Whether a registered poison is crafted with a surrogate network (it takes a crafting ``config``): hours on a
    CPU where a model-free poison takes seconds."""
    return _crafting_config(parse_poison(poison)[0]) is not None


def _settable(poison: str) -> dict[str, Any]:
    """Every setting a spec may change, with its default: the poison's keyword arguments (model-free poisons) or
    its crafting config's fields (model-based), nested configs as ``outer.inner``."""
    config = _crafting_config(poison)
    if config is None:
        params = inspect.signature(get_poison(poison)).parameters
        skip = {"images", "labels", "seed", "work_dir", "progress"}
        return {k: p.default for k, p in params.items() if k not in skip and p.default is not p.empty}
    settable = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            settable.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            settable[f.name] = value
    return settable


def parse_poison(spec: str) -> tuple[str, dict[str, Any], str]:
    """``"rem[train_steps=1000]"`` -> ``("rem", {"train_steps": 1000}, "rem[train_steps=1000]")``.

    The third element is the canonical spec (lower case, keys sorted, settings equal to their default dropped):
    the column's name and its cell files' prefix. A spec that changes nothing is the plain poison, whose cache
    and cell keys it shares.
    """
    text = spec.strip().lower()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    if name not in list_poisons():
        raise ValueError(f"poisons: unknown {[name]}; available: {', '.join(list_poisons())}.")
    if not bracket:
        return name, {}, name
    if not rest.endswith("]"):
        raise ValueError(f"poisons: {spec!r} must end with ']'; write e.g. 'rem[train_steps=1000]'.")
    settable = _settable(name)
    overrides, shown = {}, {}
    for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise ValueError(f"poisons: {spec!r}: {item!r} is not key=value; write e.g. 'rem[train_steps=1000]'.")
        if key not in settable:
            known = ", ".join(k for k, v in settable.items() if isinstance(v, (bool, int, float, str))) or "none"
            raise ValueError(f"poisons: {spec!r}: {name} has no setting {key!r}; settable: {known}.")
        if key in overrides:
            raise ValueError(f"poisons: {spec!r} sets {key!r} twice.")
        parsed = _parse_value(name, key, value, settable[key])
        if parsed != settable[key]:
            overrides[key], shown[key] = parsed, value
    config = _crafting_config(name)
    if config is not None:
        try:  # the config checks its own values (e.g. ADP's dtype): fail here, naming the spec
            _with_overrides(config, overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"poisons: {spec!r}: {e}") from None
    canonical = name + ("[" + ",".join(f"{k}={shown[k]}" for k in sorted(shown)) + "]" if shown else "")
    return name, dict(sorted(overrides.items())), canonical


def poison_settings(poison: str) -> dict[str, Any] | None:
    """A model-based poison's crafting config (its default, with a spec's changes) as a dict, part of its cache and
    cell keys; for a model-free poison, the spec's changes to its keyword arguments, or None without any."""
    name, overrides, _ = parse_poison(poison)
    config = _crafting_config(name)
    return (overrides or None) if config is None else _with_overrides(config, overrides).to_dict()


def _with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    nested: dict[str, dict[str, Any]] = {}
    flat = {}
    for key, value in overrides.items():
        outer, dot, inner = key.partition(".")
        if dot:
            nested.setdefault(outer, {})[inner] = value
        else:
            flat[key] = value
    for outer, changes in nested.items():
        flat[outer] = dataclasses.replace(getattr(config, outer), **changes)
    return dataclasses.replace(config, **flat)


def poison_call_options(poison: str) -> dict[str, Any]:
    """The keyword arguments a spec adds to the poison's call: ``config=`` (model-based) or its own keywords."""
    name, overrides, _ = parse_poison(poison)
    config = _crafting_config(name)
    return overrides if config is None or not overrides else {"config": _with_overrides(config, overrides)}
