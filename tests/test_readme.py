"""The README's promises that can be checked mechanically."""

from __future__ import annotations

from pathlib import Path

from lorafam.adapters import VARIANTS
from lorafam.reference import BEGIN, END, reference

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_recipe_reference_matches_the_schema():
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference(), "README is stale: paste the output of `python -m lorafam.reference`"


def test_every_variant_is_in_the_variants_table():
    for name in VARIANTS:
        assert f"| `{name}` |" in README, name


def test_ci_runs_the_readme_test_command():
    command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert f"```bash\n{command}\n```" in README
    assert command in (ROOT / ".ci" / "run").read_text()
    assert "```bash\nbash scripts/setup.sh && .venv/bin/lorafam train recipes/quickstart.yaml\n```" in README


def _choices(annotation) -> tuple:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return ()


def test_every_choice_the_reference_lists_for_a_variant_builds_that_adapter():
    """The reference is generated from each variant's Config: a value it lists must load and build
    (a validator refusing a listed value, as dora and lora_drop once did with pissa, fails here)."""
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from lorafam.recipe import validate_recipe
    from lorafam.run import adapt

    checked = set()
    for name, variant in VARIANTS.items():
        for key, field in variant.Config.model_fields.items():
            for value in _choices(field.annotation):
                if key == "variant":
                    continue
                adapter = {"variant": name, "r": 2, "target_modules": ["q_proj"], key: value}
                spec = validate_recipe({"model": {"name": "m"}, "adapter": adapter, "data": {"train": "x.jsonl"}, "output_dir": "o"})
                torch.manual_seed(0)
                model = LlamaForCausalLM(tiny_llama_config(vocab_size=64))
                assert adapt(model, spec, []).layers, (name, key, value)
                checked.add((name, key, value))
    assert {("lora", "init", "pissa"), ("dora", "init", "gaussian"), ("lora_drop", "init", "gaussian")} <= checked
