"""DoRA's step time against lorafam's LoRA and PEFT's DoRA on the same model, side by side (issue 12).

    python benchmarks/dora_speed.py                       # ~58M random Llama, batch 8 x 256, r 16, fp32, 2 threads
    python benchmarks/dora_speed.py --batch 4 --length 128 --rounds 6    # quicker, noisier
    python benchmarks/dora_speed.py --baseline-root /path/to/an/older/checkout   # adds that checkout's DoRA
    python benchmarks/dora_speed.py --threads 1 --clock cpu   # on a machine busy with other work

Four sides (five with --baseline-root), each in its own process, take turns in rounds
A B C D D C B A (benchmarks/vs_peft.py's machinery: same plain loop, same random batches, AdamW,
clip 1.0, adapters on every linear layer but the head). Reported: each side's median step time, and
per round its time over lorafam LoRA's in the same round (median and min..max), which is what the
targets read: lorafam DoRA <= 1.10x lorafam LoRA, and below PEFT's DoRA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_peft  # noqa: E402  (the benchmark next to this one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    vs_peft.add_common_args(parser, hidden=512, layers=8, intermediate=1408, vocab=32000, batch=8, length=256, rounds=4)
    parser.add_argument("--baseline-root", type=Path, help="another lorafam checkout whose DoRA is timed too")
    parser.add_argument("--json", type=Path, default=vs_peft.ROOT / "runs" / "dora_speed.json")
    args = parser.parse_args()

    machine = vs_peft.describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or vs_peft.make_model_folder(Path(tmp) / "model", args)
        n_params = vs_peft.describe_setup(folder, args)
        specs = {
            "lorafam LoRA": vs_peft.spec_for("lorafam", "lora", folder, args),
            "lorafam DoRA": vs_peft.spec_for("lorafam", "dora", folder, args),
            "PEFT DoRA": vs_peft.spec_for("peft", "dora", folder, args),
            "PEFT LoRA": vs_peft.spec_for("peft", "lora", folder, args),
        }
        if args.baseline_root:
            specs["baseline DoRA"] = vs_peft.spec_for("lorafam", "dora", folder, args) | {"root": str(args.baseline_root.resolve())}
        results = vs_peft.run_group(specs, args)

    reference = results["lorafam LoRA"]
    print(f"{'':16}{'s/step':>9}{'/ lorafam LoRA: median':>24}{'rounds min..max':>17}{'peak RSS MB':>13}")
    for label, result in results.items():
        ratios = vs_peft.round_ratios(result, reference)
        result["ratio_to_lorafam_lora"] = {"median": statistics.median(ratios), "rounds": ratios}
        print(f"{label:16}{result['step_s']:>9.3f}{statistics.median(ratios):>24.3f}{vs_peft.spread(ratios):>17}"
              f"{result['peak_rss'] / 1024**2:>13.0f}")
    ours_vs_peft = vs_peft.round_ratios(results["lorafam DoRA"], results["PEFT DoRA"])
    print(f"lorafam DoRA / PEFT DoRA: median {statistics.median(ours_vs_peft):.3f} ({vs_peft.spread(ours_vs_peft)} over rounds)")
    print("targets: lorafam DoRA / lorafam LoRA <= 1.10; lorafam DoRA / PEFT DoRA < 1")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    vs_peft.write_json(args.json, {"machine": machine, "settings": settings, "model_params": n_params, "results": results,
                                   "lorafam_dora_over_peft_dora": ours_vs_peft})


if __name__ == "__main__":
    main()
