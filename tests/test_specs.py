"""Poison specs (bench/specs.py): the ``--poisons`` grammar, its errors, and the settings a spec stands for."""

from __future__ import annotations

import pytest

from eclipse_transforms.bench import list_poisons, specs
from eclipse_transforms.bench.adp import ADPConfig
from eclipse_transforms.bench.rem import REMConfig
from eclipse_transforms.bench.runner import BenchConfig
from eclipse_transforms.bench.specs import parse_poison, split_poisons


def test_poison_specs_parse_validate_and_canonicalise():
    assert split_poisons(" lsp, rem[train_steps=1000,adversary_radius=0] ,ar,") == [
        "lsp",
        "rem[train_steps=1000,adversary_radius=0]",
        "ar",
    ]
    name, overrides, canonical = parse_poison("REM[train_steps=2000, adversary_radius=0, pgd_steps=5]")
    assert (name, canonical) == ("rem", "rem[adversary_radius=0,train_steps=2000]")  # sorted; defaults dropped
    assert overrides == {"adversary_radius": 0.0, "train_steps": 2000}
    assert parse_poison("rem[adversary_radius=4/255]") == ("rem", {}, "rem")  # the default: the plain poison
    assert parse_poison("urp[epsilon=16/255]")[1] == {"epsilon": pytest.approx(16 / 255)}
    assert specs.poison_settings("rem") == REMConfig().to_dict()
    assert specs.poison_settings("lsp") is None and specs.poison_settings("urp[epsilon=4/255]") == {"epsilon": 4 / 255}
    config = specs.poison_call_options("adp[em.pgd_steps=10]")["config"]
    assert config.em.pgd_steps == 10 and config.em.max_rounds == ADPConfig().em.max_rounds
    assert specs.poison_call_options("rem[eot_samples=1]")["config"] == REMConfig(eot_samples=1)
    assert specs.poison_call_options("adp[dtype=bfloat16]")["config"].dtype == "bfloat16"  # a text setting
    for spec, message in [
        ("rem[steps=3]", "rem has no setting 'steps'; settable: epsilon"),
        ("rem[train_steps=abc]", r"rem\[train_steps=abc\]: expected int \(default 1000\)"),
        ("rem[train_steps]", "is not key=value"),
        ("rem[train_steps=1,train_steps=2]", "sets 'train_steps' twice"),
        ("rem[widths=8]", "only number, true/false and text settings"),
        ("rem[train_steps=1", "unbalanced brackets"),
        ("rem[a=1]],lsp", "unbalanced brackets"),
        ("xyz[a=1]", r"unknown \['xyz'\]"),
        ("adp[dtype=int8]", r"'adp\[dtype=int8\]': dtype must be one of float32, bfloat16, float16"),
    ]:
        with pytest.raises(ValueError, match=message):
            BenchConfig(data="x", poisons=spec)
    config = BenchConfig(data="x", poisons="lsp,rem[train_steps=2000,adversary_radius=0]")
    assert config.poisons == ("lsp", "rem[adversary_radius=0,train_steps=2000]")
    assert BenchConfig.from_dict(config.to_dict()) == config


def test_is_model_based_tells_crafted_poisons_from_model_free_ones():
    crafted = [name for name in list_poisons() if specs.is_model_based(name)]
    assert crafted == ["adp", "em", "rem", "sep", "tap"]
    assert specs.is_model_based("em[dtype=bfloat16]") and not specs.is_model_based("lsp")
    with pytest.raises(ValueError, match=r"unknown \['xyz'\]"):
        specs.is_model_based("xyz")
