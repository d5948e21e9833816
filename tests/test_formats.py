"""Shared checks over the format registry: a new format is covered the moment it is registered."""

from __future__ import annotations

import json
import typing

import pytest

from lorafam.data import IGNORE_INDEX, prepare_data
from lorafam.data.formats import FORMATS, detect_format, packing_refusal
from lorafam.errors import LorafamError
from lorafam.recipe import DataConfig

# One usable row per format. A new format needs its row here (the test below says so).
SAMPLE_ROWS = {
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    "chat": {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]},
    "text": {"text": "The cat sat on the mat."},
    "prompt-completion": {"prompt": "2+2=", "completion": "4"},
    "classification": {"text": "stocks fell", "label": "business"},
    "preference": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    "preference-chat": {
        "chosen": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Go away."}],
    },
}


def test_every_format_has_a_sample_row():
    assert sorted(SAMPLE_ROWS) == sorted(FORMATS), "add a sample row for each registered format"


def test_recipe_choices_are_the_registry():
    assert typing.get_args(DataConfig.model_fields["format"].annotation) == ("auto", *FORMATS)


def test_priorities_are_distinct():
    assert len({f.priority for f in FORMATS.values()}) == len(FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_detected_from_exactly_its_columns(name):
    # A format whose columns include another's must come first, or it could never be detected.
    assert detect_format(list(FORMATS[name].columns)) == name


@pytest.mark.parametrize("name", list(FORMATS))
def test_prepares_its_sample_row(tmp_path, name, gpt2_tokenizer, bert_tokenizer):
    fmt = FORMATS[name]
    classification = fmt.task == "sequence-classification"
    tokenizer = bert_tokenizer if classification else gpt2_tokenizer
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SAMPLE_ROWS[name]) + "\n" + json.dumps(SAMPLE_ROWS[name]) + "\n")
    prepared = prepare_data(DataConfig(train=str(path), eval=str(path)), tokenizer, fmt.task, 0)
    assert prepared.format == name and prepared.report["kept"] == 4
    labels = prepared.train[0]["labels"]
    if classification:
        assert prepared.label_names is not None and labels == 0
    else:
        assert any(label != IGNORE_INDEX for label in labels)


@pytest.mark.parametrize("name", list(FORMATS))
def test_missing_column_is_named(tmp_path, name, gpt2_tokenizer):
    fmt = FORMATS[name]
    row = {k: v for k, v in SAMPLE_ROWS[name].items() if k != fmt.columns[-1]} | {"other": "x"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LorafamError, match=f"^data.train: format {name} needs column {fmt.columns[-1]}"):
        prepare_data(DataConfig(train=str(path), format=name), gpt2_tokenizer, fmt.task, 0)


@pytest.mark.parametrize("name", list(FORMATS))
def test_packing_applies_unless_the_format_says_why_not(tmp_path, name, gpt2_tokenizer, bert_tokenizer):
    fmt = FORMATS[name]
    refusal = packing_refusal(name, fmt.task)
    if fmt.unpackable:
        assert refusal is not None and fmt.unpackable in refusal
        return
    assert refusal is None
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(SAMPLE_ROWS[name]) + "\n") * 6)
    prepared = prepare_data(DataConfig(train=str(path), eval=str(path), packing=True), gpt2_tokenizer, fmt.task, 0)
    assert prepared.packing.examples == 6 and len(prepared.train) < 6
