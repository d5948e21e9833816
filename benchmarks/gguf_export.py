"""`lorafam export` of one run at several GGUF types: file size, export time, error, llama.cpp speed.

    python benchmarks/gguf_export.py RUN_DIR                          # f16, q8_0, q4_0
    python benchmarks/gguf_export.py RUN_DIR --quants f32 f16 q8_0 q5_1 q4_0
    python benchmarks/gguf_export.py RUN_DIR --llama-cpp BUILD/bin    # also llama.cpp's tokens/s

For each type: the GGUF's size; the wall time of `export_run` (merge included); the file read back
by transformers' GGUF loader against the merged float model on a fixed chat prompt (max |logit
difference|, max |logit|, and on how many positions the top-1 token agrees). With ``--llama-cpp``
(a folder holding llama.cpp's ``llama-bench`` and ``llama-tokenize``): llama-tokenize's ids for the
prompt against transformers', and llama-bench's prompt-processing and generation tokens/s. Not a
test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PROMPT = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence, then name 3 other cities."},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--llama-cpp", type=Path, help="folder with llama-bench and llama-tokenize")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the exports here instead of a temporary folder")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafam.export import export_run
    from lorafam.merge import merged_model
    from lorafam.run import open_run

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir)
    ids = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        want = merged_model(open_run(args.run_dir))(input_ids=torch.tensor([ids])).logits.float()

    root = args.keep or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    rows = []
    for quant in args.quants:
        out = root / quant
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        result = export_run(args.run_dir, out, quant=quant)
        seconds = time.perf_counter() - start
        read = AutoModelForCausalLM.from_pretrained(out, gguf_file=result.gguf_path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = read(input_ids=torch.tensor([ids])).logits.float()
        row = {
            "quant": quant,
            "size_mib": round(result.size_bytes / 2**20, 1),
            "export_s": round(seconds, 1),
            "max_abs_logit_diff": round((got - want).abs().max().item(), 4),
            "max_abs_logit": round(want.abs().max().item(), 2),
            "top1_agree": f"{(got.argmax(-1) == want.argmax(-1)).sum().item()}/{len(ids)}",
        }
        if args.llama_cpp:
            row |= llama_cpp(args.llama_cpp, result.gguf_path, tokenizer.decode(ids), ids, args.threads)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


def llama_cpp(folder: Path, gguf_path: Path, prompt: str, ids: list[int], threads: int) -> dict:
    tokenized = subprocess.run(
        [str(folder / "llama-tokenize"), "-m", str(gguf_path), "-p", prompt, "--ids", "--log-disable", "--no-bos"],
        capture_output=True, text=True, check=True,
    )
    llama_ids = json.loads(tokenized.stdout.strip().splitlines()[-1])
    bench = subprocess.run(
        [str(folder / "llama-bench"), "-m", str(gguf_path), "-p", "128", "-n", "64", "-t", str(threads), "-r", "3", "-o", "json"],
        capture_output=True, text=True, check=True,
    )
    speeds = {("prompt" if r["n_prompt"] else "generate"): round(r["avg_ts"], 1) for r in json.loads(bench.stdout)}
    return {"llama_tokenize_matches": llama_ids == ids, "pp128_tok_s": speeds.get("prompt"), "tg64_tok_s": speeds.get("generate")}


if __name__ == "__main__":
    main()
