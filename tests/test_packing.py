"""data.packing: several examples per row, with the same loss as one example per row.

The model side is transformers' padding-free path: restarting position ids, no attention mask,
no cache. Checked on a tiny random Llama with sdpa and eager attention.
"""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, LlamaForCausalLM

from conftest import tiny_llama_config
from lorafam.data import IGNORE_INDEX, make_collator, prepare_data
from lorafam.data.packing import assign_rows, check_packing_support, pack, padding_fraction
from lorafam.errors import LorafamError
from lorafam.recipe import DataConfig, validate_recipe

ATTENTION = ["sdpa", "eager"]


def tiny_llama(attn: str, vocab_size: int = 50257) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).float().eval()
    assert model.config._attn_implementation == attn
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction data of varied lengths (prompts masked, so labels start mid-example)."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while dogs ran past quickly and birds sang loudly".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [{"instruction": say(rng.randint(1, 12)), "input": "", "output": say(rng.randint(1, 20))} for _ in range(n)]


def prepare(tokenizer, path, packing, seed=0, max_length=96, **cfg):
    return prepare_data(DataConfig(train=path, packing=packing, max_length=max_length, **cfg), tokenizer, "causal-lm", seed)


def all_rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


def split_examples(row: dict) -> list[dict]:
    """A packed row cut back into its examples at the position-id restarts."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [{k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")} for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def packed_pair(tmp_path_factory, gpt2_tokenizer):
    """The same 60 alpaca examples prepared plain and packed (same seed: same split)."""
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "a.jsonl", alpaca_rows(60))
    return prepare(gpt2_tokenizer, path, False), prepare(gpt2_tokenizer, path, True)


@pytest.fixture(scope="module")
def model_pair():
    """40 examples of 2-40 tokens in a 1,000-token vocabulary (a small LM head keeps the model
    tests fast), prompts masked as instruction data is, plain and packed to 64 tokens."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):
        n = int(torch.randint(2, 41, (1,), generator=gen))
        ids = torch.randint(1, 1000, (n,), generator=gen).tolist()
        prompt = int(torch.randint(0, n - 1, (1,), generator=gen))
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    plain = datasets.Dataset.from_list(rows)
    packed, _ = pack(plain, 64, seed=0)
    return all_rows(plain), all_rows(packed)


PAD = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 0})()  # all the collator reads


# --------------------------------------------------------------------------------------------------
# The packed rows themselves


def test_packed_rows_hold_every_example_whole(packed_pair):
    plain, packed = packed_pair
    assert packed.train.column_names == ["input_ids", "labels", "position_ids"]
    assert len(packed.train) < len(plain.train)
    pieces = []
    for row in all_rows(packed.train):
        assert len(row["input_ids"]) <= 96 and len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        for example in split_examples(row):
            assert example["position_ids"] == list(range(len(example["input_ids"])))
            # Labels never cross examples: the first label would be predicted from the previous
            # example's last token, so it carries no loss (unpacked it is never predicted either).
            assert example["labels"][0] == IGNORE_INDEX
            pieces.append((tuple(example["input_ids"]), tuple(example["labels"][1:])))
    originals = [(tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in all_rows(plain.train)]
    assert sorted(pieces) == sorted(originals)


def test_text_examples_lose_only_their_first_label(tmp_path, gpt2_tokenizer):
    # Text trains every token, so here the first label is a real token that packing must drop.
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * (i % 7 + 1)} for i in range(30)])
    rows = all_rows(prepare(gpt2_tokenizer, path, True, max_length=32, eval=path).train)
    assert any(len(split_examples(row)) > 1 for row in rows)
    for row in rows:
        for example in split_examples(row):
            assert example["labels"] == [IGNORE_INDEX] + example["input_ids"][1:]


def test_eval_is_not_packed(packed_pair):
    plain, packed = packed_pair
    assert packed.eval.column_names == ["input_ids", "attention_mask", "labels"]
    assert all_rows(packed.eval) == all_rows(plain.eval)
    assert packed.report == plain.report and plain.packing is None


def test_packing_report(packed_pair):
    plain, packed = packed_pair
    stats = packed.packing
    assert (stats.examples, stats.rows) == (len(plain.train), len(packed.train))
    assert sum(stats.row_lengths) == sum(stats.example_lengths) == sum(len(r) for r in plain.train["input_ids"])
    before, after = stats.padding(8)
    assert before == padding_fraction([len(r) for r in plain.train["input_ids"]], 8)
    assert 0 <= after < before
    record = stats.as_dict(8)
    assert record["rows_before"] == stats.examples and record["rows_after"] == stats.rows
    assert f"into {stats.rows} rows" in stats.summary(8)


def test_padding_fraction_counts_padding_per_batch():
    # batches [3, 1] and [2]: 2 of 6 + 0 of 2 padded, in the seeded order this seed gives
    lengths = [3, 1, 2]
    order = list(range(3))
    random.Random(0).shuffle(order)
    batches = [[lengths[i] for i in order[:2]], [lengths[order[2]]]]
    padded = sum(max(b) * len(b) for b in batches)
    assert padding_fraction(lengths, 2) == pytest.approx(1 - 6 / padded)
    assert padding_fraction([4, 4, 4], 2) == 0.0


def test_best_fit_decreasing():
    # Longest first, each into the row it fills most tightly: 6 | 5 | 4 -> row of 6 (fills it to 10),
    # 3 -> row of 5, 2 -> row of 5+3. Next-fit in the same order would need three rows.
    assert assign_rows([6, 5, 4, 3, 2], 10, seed=0) == [[0, 2], [1, 3, 4]]
    lengths = [random.Random(1).randint(1, 64) for _ in range(500)]
    rows = assign_rows(lengths, 128, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 128) + 2  # within two rows of the bound, for these lengths


def test_packing_is_deterministic_for_a_seed(tmp_path, gpt2_tokenizer):
    # Equal lengths everywhere: only the seeded tie order decides which examples share a row.
    rows = [{"text": f"row {i:03d} x"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = prepare(gpt2_tokenizer, path, True, seed=5, max_length=16, eval=path)
    again = prepare(gpt2_tokenizer, path, True, seed=5, max_length=16, eval=path)
    other = prepare(gpt2_tokenizer, path, True, seed=6, max_length=16, eval=path)
    assert all_rows(first.train) == all_rows(again.train)
    assert all_rows(first.train) != all_rows(other.train)


# --------------------------------------------------------------------------------------------------
# Collation


def test_collator_pads_packed_rows_as_a_sequence_of_their_own(gpt2_tokenizer):
    collate = make_collator(gpt2_tokenizer, "causal-lm")
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]},
    ]
    batch = collate(rows)
    pad = gpt2_tokenizer.pad_token_id
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention_mask: see make_collator
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, pad, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert all(t.dtype == torch.long for t in batch.values())


# --------------------------------------------------------------------------------------------------
# The model: same loss, no attention across examples or into padding


def token_losses(model, batch) -> tuple[torch.Tensor, int]:
    """Sum of per-token cross-entropies (fp32) and the number of label tokens, shift as in training."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    targets = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_loss_equals_unpacked_loss(model_pair, attn):
    plain, packed = model_pair
    model = tiny_llama(attn, vocab_size=1000)
    collate = make_collator(PAD, "causal-lm")
    plain_batch, packed_batch = collate(plain), collate(packed)
    assert len(packed) < len(plain) and packed_batch["input_ids"].numel() < plain_batch["input_ids"].numel()

    plain_sum, plain_count = token_losses(model, plain_batch)
    packed_sum, packed_count = token_losses(model, packed_batch)
    assert packed_count == plain_count
    assert (packed_sum / packed_count).item() == pytest.approx((plain_sum / plain_count).item(), rel=1e-5)

    # The model's own loss, as the trainer calls it (every key of the batch, use_cache=False)...
    plain_loss = model(**plain_batch, use_cache=False).loss
    packed_loss = model(**packed_batch, use_cache=False).loss
    assert packed_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert packed_loss.item() == pytest.approx((plain_sum / plain_count).item(), rel=1e-5)
    # ...and its gradients.
    grads = []
    for loss in (plain_loss, packed_loss):
        model.zero_grad()
        loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attn", ATTENTION)
def test_no_attention_across_examples_or_into_padding(attn):
    model = tiny_llama(attn, vocab_size=1000)
    gen = torch.Generator().manual_seed(0)
    first, second, third = (torch.randint(1, 1000, (n,), generator=gen) for n in (7, 5, 4))

    def logits(ids, positions=None):
        kwargs = {} if positions is None else {"position_ids": positions}
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, **kwargs).logits

    row = torch.cat([first, second]).unsqueeze(0)
    positions = torch.tensor([list(range(7)) + list(range(5))])
    packed = logits(row, positions)
    torch.testing.assert_close(packed[0, 7:], logits(second.unsqueeze(0))[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[0, :7], logits(first.unsqueeze(0))[0], rtol=1e-4, atol=1e-5)
    # Other tokens in example 1 leave example 2's logits exactly as they were...
    changed = row.clone()
    changed[0, :7] = torch.randint(1, 1000, (7,), generator=gen)
    torch.testing.assert_close(logits(changed, positions)[0, 7:], packed[0, 7:], rtol=1e-5, atol=1e-6)
    # ...while without position ids (one long sequence) they would not: the check can fail.
    assert not torch.allclose(logits(changed)[0, 7:], logits(row)[0, 7:], atol=1e-5)

    # A shorter row in the same batch, padded by the collator: its real tokens are unaffected by
    # the padding, whatever the pad ids are, and the padding carries no loss.
    collate = make_collator(PAD, "causal-lm")
    rows = [
        {"input_ids": row[0].tolist(), "labels": row[0].tolist(), "position_ids": positions[0].tolist()},
        {"input_ids": third.tolist(), "labels": third.tolist(), "position_ids": list(range(4))},
    ]
    batch = collate(rows)
    assert (batch["labels"][1, 4:] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(out[1, :4], logits(third.unsqueeze(0))[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], packed[0], rtol=1e-4, atol=1e-5)
    other_pad = batch["input_ids"].clone()
    other_pad[1, 4:] = 999
    with torch.no_grad():
        loss_a = model(**batch, use_cache=False).loss
        loss_b = model(**{**batch, "input_ids": other_pad}, use_cache=False).loss
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)


def test_the_model_call_needs_use_cache_false(model_pair):
    """Why the trainer passes use_cache=False: with a cache, transformers ignores the packing."""
    plain, packed = model_pair
    model = tiny_llama("sdpa", vocab_size=1000)
    collate = make_collator(PAD, "causal-lm")
    with torch.no_grad():
        expected = model(**collate(plain), use_cache=False).loss.item()
        leaking = model(**collate(packed)).loss.item()  # config.use_cache is True
    assert leaking != pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_packing_support_check_passes_llama(attn):
    model = tiny_llama(attn, vocab_size=1000).train()
    check_packing_support(model)
    assert model.training  # mode restored


def test_packing_support_check_refuses_a_model_that_leaks():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=1000, hidden_size=32, n_layer=2, n_head=4))  # ALiBi, no position ids
    with pytest.raises(LorafamError, match="^data.packing: BloomForCausalLM lets packed examples see each other"):
        check_packing_support(bloom)


# --------------------------------------------------------------------------------------------------
# Where packing does not apply


RECIPE = {
    "model": {"name": "m"},
    "adapter": {"variant": "lora"},
    "data": {"train": "t.jsonl", "packing": True},
    "output_dir": "out",
}


def test_recipe_refuses_packing_for_classification():
    assert validate_recipe(json.loads(json.dumps(RECIPE))).data.packing is True
    assert DataConfig(train="x").packing is False
    raw = json.loads(json.dumps(RECIPE))
    raw["model"]["task"] = "sequence-classification"
    with pytest.raises(LorafamError, match="data.packing: format classification cannot put several examples in one row"):
        validate_recipe(raw)
    raw = json.loads(json.dumps(RECIPE))
    raw["data"]["format"] = "classification"
    with pytest.raises(LorafamError, match="set data.packing: false"):
        validate_recipe(raw)


def test_prepare_data_refuses_packing_for_classification(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(LorafamError, match="^data.packing: format classification"):
        prepare_data(DataConfig(train=path, packing=True), bert_tokenizer, "sequence-classification", 0)


@pytest.mark.parametrize("labels", [[[1], [2, 3]], [0, 1]])
def test_pack_needs_one_label_per_token(labels):
    table = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": labels})
    with pytest.raises(ValueError, match="one label per token"):
        pack(table, 8, 0)


def test_lorafam_train_with_packing_reports_it_and_trains(tmp_path, monkeypatch):
    """Through the real CLI: packed rows reach the model (no attention mask, restarting positions,
    no cache) and the run records what packing saved."""
    import transformers
    from tinyrun import cli, make_model_folder, make_text_data, write_recipe

    model, data = make_model_folder(tmp_path / "model"), make_text_data(tmp_path / "train.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run",
                          train={"max_steps": 6, "save_every": None, "mixed_precision": "no"},
                          data_keys={"packing": True, "max_length": 48})
    calls, forward = [], transformers.LlamaModel.forward

    def recording(self, *args, **kwargs):
        if self.training:
            calls.append(kwargs)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaModel, "forward", recording)
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    assert len(calls) == 6
    for kwargs in calls:
        assert kwargs.get("attention_mask") is None and kwargs["use_cache"] is False
        assert (kwargs["position_ids"][:, 1:] < kwargs["position_ids"][:, :-1]).any()  # positions restart in a row
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    packing = info["packing"]
    assert packing["rows_before"] == 56 and packing["rows_after"] < 56
    assert packing["padding_after"] < packing["padding_before"]
    assert f"packed 56 examples into {packing['rows_after']} rows of up to 48 tokens" in " ".join(result.output.split())
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"]
