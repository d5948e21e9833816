"""What keyed adapter dropout costs: one forward+backward with per-example masks against nn.Dropout.

    python benchmarks/dropout_keys.py                  # the quickstart's model and adapter, batch 4 x 128
    python benchmarks/dropout_keys.py --batch 8 --pairs 12

lorafam draws each row's dropout mask from its own generator, keyed by the example
(lorafam/adapters/dropout.py), so masks do not depend on the batch layout; outside a keyed forward
the same module is plain nn.Dropout. This runs both on the same model, batch and process, in
interleaved pairs (A B, then B A), and prints the median of the paired time ratios. Random tokens,
every row at full length, the last 88 positions labelled. Not a test: the figures depend on the
machine, printed with its CPU flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorafam.adapters.dropout import keyed  # noqa: E402
from lorafam.hardware import cpu_line  # noqa: E402
from lorafam.modeling import head_modules, load_model  # noqa: E402
from lorafam.recipe import load_recipe  # noqa: E402
from lorafam.run import adapt  # noqa: E402
from lorafam.tasks.causal_lm import CausalLMLoss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()

    spec = load_recipe(args.recipe)
    torch.manual_seed(0)
    model = load_model(spec.model)
    adapt(model, spec, head_modules(model, spec.model.task))
    loss_model = CausalLMLoss(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    labels = ids.clone()
    labels[:, : args.length - 88] = -100
    keys = list(range(args.batch))

    def step(context: AbstractContextManager) -> float:
        start = time.perf_counter()
        with context:
            loss_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)["loss_sum"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(nullcontext()), step(keyed(keys, args.length))  # warm-up
    times: dict[str, list[float]] = {"keyed": [], "nn.Dropout": []}
    for i in range(args.pairs):
        for name in ("keyed", "nn.Dropout") if i % 2 == 0 else ("nn.Dropout", "keyed"):
            times[name].append(step(keyed(keys, args.length) if name == "keyed" else nullcontext()))
    ratios = [a / b for a, b in zip(times["keyed"], times["nn.Dropout"])]
    print(f"{spec.model.name}, {spec.adapter.variant} dropout {spec.adapter.dropout}, batch {args.batch} x {args.length}, "
          f"fp32, {torch.get_num_threads()} threads · {cpu_line()}")
    print(f"forward+backward: keyed {statistics.median(times['keyed']):.3f} s, nn.Dropout "
          f"{statistics.median(times['nn.Dropout']):.3f} s (medians of {args.pairs}); keyed / nn.Dropout, paired: "
          f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}..{max(ratios):.3f}")


if __name__ == "__main__":
    main()
