"""Recipe validation: every shipped recipe loads, and bad recipes fail with the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafam.adapters import VARIANTS
from lorafam.errors import LorafamError
from lorafam.recipe import apply_override, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
MINIMAL = {"model": {"name": "m"}, "adapter": {"variant": "lora"}, "data": {"train": "d.jsonl"}, "output_dir": "o"}


def test_there_are_shipped_recipes():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "lora", "classify_bbc"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.adapter.variant in VARIANTS
    assert recipe.output_dir.startswith("runs/")


def test_every_variant_has_a_recipe():
    variants = {load_recipe(p).adapter.variant for p in RECIPES}
    missing = set(VARIANTS) - variants
    assert not missing, f"variants without a recipes/<variant>.yaml: {sorted(missing)}"


def test_set_values_are_parsed_as_yaml():
    raw = {"adapter": {"variant": "lora"}}
    apply_override(raw, "adapter.target_modules=[q_proj,v_proj]")
    apply_override(raw, "train.lr=1e-4")
    apply_override(raw, "train.max_steps=5")
    assert raw["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    # YAML 1.1 reads 1e-4 as a string; the typed recipe still gets the number.
    recipe = validate_recipe({**MINIMAL, **raw})
    assert (recipe.train.lr, recipe.train.max_steps) == (1e-4, 5)


def test_set_overrides_a_loaded_recipe(tmp_path):
    path = next(p for p in RECIPES if p.stem == "quickstart")
    recipe = load_recipe(path, ["adapter.r=2", "train.seed=7", f"output_dir={tmp_path}"])
    assert (recipe.adapter.r, recipe.train.seed, recipe.output_dir) == (2, 7, str(tmp_path))


def test_output_dir_defaults_to_runs_and_the_recipe_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {name: m}\nadapter: {variant: lora}\ndata: {train: d.jsonl}\n")
    assert load_recipe(path).output_dir == "runs/mine"


def test_neither_steps_nor_epochs_means_one_epoch():
    recipe = validate_recipe(dict(MINIMAL))
    assert (recipe.train.max_steps, recipe.train.epochs) == (None, 1.0)


BAD = [
    ({"adapter": {"variant": "lora", "rank": 4}}, "adapter.rank: unknown key"),
    ({"adapter": {"variant": "lora", "r": 0}}, "adapter.r: Input should be greater than or equal to 1"),
    ({"adapter": {"variant": "nope"}}, "adapter.variant: unknown variant 'nope'"),
    ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
    ({"model": {"nmae": "m"}}, "model.nmae: unknown key"),
    ({"data": {"train": "d.jsonl", "format": "xml"}}, "data.format: Input should be"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"adapter": {"variant": "lora", "target_modules": 3}}, "adapter.target_modules"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_recipes_name_the_key(change, message):
    with pytest.raises(LorafamError) as info:
        validate_recipe({**MINIMAL, **change}, source="r.yaml")
    text = str(info.value)
    assert text.startswith("r.yaml: ") and message in text, text
    assert "\n" not in text


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(LorafamError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(LorafamError, match="not valid YAML at line"):
        load_recipe(broken)
    with pytest.raises(LorafamError, match="expected section.key=value"):
        load_recipe(next(p for p in RECIPES if p.stem == "quickstart"), ["noequals"])
