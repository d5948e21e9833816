"""The two GGUF exports of one run side by side: file sizes and llama.cpp's speed with each.

    python benchmarks/gguf_lora.py RUN_DIR [--quant q8_0] [--threads 2] [--repeats 3]

Exports RUN_DIR merged (``--format gguf``) and as base + adapter (``--format gguf-lora --base``) at
``--quant``, then runs llama-completion (from scripts/build_llamacpp.sh's cache, see
tests/llamacpp.py) greedily on one prompt, 64 new tokens, with the merged file and with the base +
``--lora``, ``--repeats`` times each, and prints each setup's median prompt-processing and generation
tokens/s from llama.cpp's own timing lines, and whether the two continuations are the same text (and for how many words).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llamacpp  # noqa: E402

from lorafam.export import export_run  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SPEED = re.compile(r"common_perf_print:\s+(prompt eval|eval) time =.*?([0-9.]+) tokens per second")


def completion(model: Path, threads: int, lora: Path | None) -> tuple[str, dict[str, float]]:
    args = [str(llamacpp.tool("llama-completion")), "-m", str(model), "-p", PROMPT, "-n", "64", "-no-cnv",
            "--no-display-prompt", "--top-k", "1", "--temp", "0", "-t", str(threads), "-c", "512", "--ignore-eos"]
    if lora is not None:
        args += ["--lora", str(lora)]
    for _ in range(3):  # see tests/llamacpp.run: a run can exit 0 having printed nothing
        proc = subprocess.run(args, capture_output=True)
        err = proc.stderr.decode(errors="replace")
        speeds = {kind: float(value) for kind, value in SPEED.findall(err)}
        if proc.returncode == 0 and len(speeds) == 2:
            return proc.stdout.decode(errors="replace"), speeds
    raise SystemExit(f"llama-completion failed:\n{err[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="gguf_lora_"))
    merged = export_run(args.run_dir, out / "merged", fmt="gguf", quant=args.quant)
    split = export_run(args.run_dir, out / "lora", fmt="gguf-lora", quant=args.quant, base=True)
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    print(f"merged {merged.gguf_path.name}: {mib(merged.size_bytes)}")
    print(f"base {split.base_gguf_path.name}: {mib(split.base_size_bytes)}; adapter {split.gguf_path.name}: "
          f"{mib(split.size_bytes)} ({len(split.ranks)} tensors, ranks {sorted(set(split.ranks.values()))})")

    texts = {}
    for name, model, lora in (("merged", merged.gguf_path, None), ("base + --lora", split.base_gguf_path, split.gguf_path)):
        runs = [completion(model, args.threads, lora) for _ in range(args.repeats)]
        texts[name] = runs[0][0]
        pp = statistics.median(r[1]["prompt eval"] for r in runs)
        tg = statistics.median(r[1]["eval"] for r in runs)
        print(f"{name}: prompt {pp:.1f} tok/s, generation {tg:.1f} tok/s (median of {args.repeats}, -t {args.threads})")
    a, b = texts["merged"], texts["base + --lora"]
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"same continuation: {a == b} (first {len(a[:common].split())} words equal)")
    print(f"  merged:        {a[:200]!r}\n  base + --lora: {b[:200]!r}")


if __name__ == "__main__":
    main()
