"""Mutation spot-check: plant one real bug at a time and run the tests that must catch it.

Each mutant is a list of exact text replacements in one source file and the test file (with an
optional ``-k`` selection, to keep the check to minutes on a 2-core machine) that must fail with it.
The checkout is copied to a temporary folder (tracked and untracked, non-ignored files), the mutant
applied there, and the tests run in the copy with this checkout's .venv and PYTHONPATH pointing at the
copy, so subprocesses and `accelerate launch` workers import the mutated code too. The working tree
is never modified. A replacement whose text is not found is an error (the mutant went stale), not a
"caught".

    .venv/bin/python scripts/mutants.py            # every mutant, then the table
    .venv/bin/python scripts/mutants.py NAME ...   # some of them
    .venv/bin/python scripts/mutants.py --list

Exit status 1 when a mutant survives (or is stale). A clean run of each selection is checked first
(``--no-baseline`` skips it), so a test that fails on the clean tree cannot count as a catch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str  # the claim the bug breaks
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: str
    select: str | None = None


MUTANTS = [
    Mutant(
        "adalora_keeps_lowest", "AdaLoRA keeps the top-budget triplets by score", "lorafam/adapters/adalora.py",
        (("torch.argsort(scores, descending=True, stable=True)", "torch.argsort(scores, descending=False, stable=True)"),),
        "tests/test_adalora.py", "top_budget",
    ),
    # (|I - Ibar| taken with the previous Ibar instead of the updated one is no bug to plant: it is
    # |I - Ibar_new| / beta1 for every entry, so it scales all scores alike and keeps the same triplets.)
    Mutant(
        "adalora_score_ignores_uncertainty", "AdaLoRA scores by sensitivity x uncertainty", "lorafam/adapters/adalora.py",
        (("return self.sensitivity[key] * self.uncertainty[key]", "return self.sensitivity[key]"),),
        "tests/test_adalora.py", "top_budget",
    ),
    Mutant(
        "resume_skips_rng_restore", "a resume restores the RNG states", "lorafam/trainer.py",
        (("        restore_rng(resume)  # last", "        pass  # last"),),
        "tests/test_base_dropout.py", "resume",
    ),
    Mutant(
        "base_dropout_left_on", "model.base_dropout: off switches the base model's dropout off", "lorafam/modeling.py",
        (('    if cfg.base_dropout == "off":\n        switch_off_dropout(model)', '    if False:\n        switch_off_dropout(model)'),),
        "tests/test_base_dropout.py", "layout or loading",
    ),
    Mutant(
        "base_dropout_misses_attention_rates", "Llama-style attention_dropout rates are switched off too",
        "lorafam/modeling.py",
        (('is_rate = (name == "p" and isinstance(module, nn.Dropout)) or "dropout" in name',
          'is_rate = name == "p" and isinstance(module, nn.Dropout)'),),
        "tests/test_base_dropout.py", "llama",
    ),
    Mutant(
        "eval_mean_of_batch_means", "eval loss is Σ loss / Σ tokens", "lorafam/evaluate.py",
        (
            ("    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, label units, correct\n",
             "    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, label units, correct\n    batch_means = []\n"),
            ("            if counted:\n                correct = out.get(\"correct\")\n",
             "            if counted:\n                batch_means.append(float(out[\"loss_sum\"]) / max(float(out[\"count\"]), 1.0))\n"
             "                correct = out.get(\"correct\")\n"),
            ("    all_reduce_sum(sums)\n", "    all_reduce_sum(sums)\n    sums[0] = sum(batch_means) / len(batch_means) * sums[1]\n"),
        ),
        "tests/test_evaluate.py",
    ),
    Mutant(
        "eval_in_accelerates_bf16_wrapper", "the eval during training runs in fp32 (as `lorafam eval`)", "lorafam/evaluate.py",
        (("    restore_forwards = _without_accelerate_autocast(loss_model)\n", "    restore_forwards = lambda: None\n"),),
        "tests/test_evaluate.py", "saved_run",
    ),
    Mutant(
        "perplexity_of_the_sum", "perplexity = exp(mean loss)", "lorafam/tasks/causal_lm.py",
        (('"perplexity": self.perplexity(out["loss"])', '"perplexity": self.perplexity(loss_sum)'),),
        "tests/test_evaluate.py",
    ),
    Mutant(
        "modelfile_drops_end_of_turn_stop", "a PARAMETER stop for each end-of-turn token", "lorafam/export/ollama.py",
        (('for text in (chat.end_of_turn(), chat.prefix.get("user") or ""):', 'for text in (chat.prefix.get("user") or "",):'),),
        "tests/test_export.py", "stop",
    ),
    Mutant(
        "resume_on_another_process_count_rewrites_run_json", "another process count is refused in one line, touching nothing",
        "lorafam/run.py",
        (('if checkpoint is not None and (written := checkpoint.state.get("processes", 1)) != processes:',
          'if False and (written := checkpoint.state.get("processes", 1)) != processes:'),),
        "tests/test_distributed_resume.py",
    ),
    Mutant(
        "resume_starts_a_step_late", "a resumed run takes every step the uninterrupted one takes", "lorafam/trainer.py",
        (("return result, resume.step + 1", "return result, resume.step + 2"),),
        "tests/test_distributed_resume.py",
    ),
    Mutant(
        "resume_without_variant_state", "a compiled run resumes bitwise for every variant (AdaLoRA's scores)",
        "lorafam/checkpoint.py",
        (("    variant.load_train_state(load_tensors(variant_state) if variant_state.is_file() else {})",
          "    pass"),),
        "tests/test_compile.py", "interrupted and adalora",
    ),
    Mutant(
        "dropout_keyed_by_position_in_micro_batch", "a step does not depend on its layout (adapter dropout)",
        "lorafam/trainer.py",
        (("keys = [mix(self.dropout_seed, step, i) for i in idx]", "keys = [mix(self.dropout_seed, step, j) for j, _ in enumerate(idx)]"),),
        "tests/test_distributed.py", "grad_accum_trains_the_same",
    ),
    Mutant(
        "rslora_scales_by_r", "rsLoRA scales by alpha / sqrt(r)", "lorafam/adapters/lora.py",
        (("cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)", "cfg.alpha / cfg.r"),),
        "tests/test_peft_compat.py", "rslora",
    ),
    Mutant(
        "lora_plus_ignores_ratio", "LoRA+ trains B at lr x lr_ratio", "lorafam/adapters/lora_plus.py",
        (("fast = lr * cfg.lr_ratio", "fast = lr"),),
        "tests/test_pissa_lora_plus_lora_fa.py",
    ),
    # Issue 18: the run as objects. The fingerprint pins what every recipe trains.
    Mutant(
        "prepare_pass_trains_in_eval_mode", "a run trains exactly what it trained before the restructuring",
        "lorafam/trainer.py", (("    s.loss_model.train()  # (draws", "    s.loss_model.eval()  # (draws"),),
        "tests/test_fingerprint.py", "lora_drop and one_process",
    ),
    # Issue 19: GLoRA's structure search.
    Mutant(
        "supernet_draws_one_structure", "each supernet step draws its own forms", "lorafam/adapters/glora.py",
        (("draw(layers, self.supernet_seed, step + 1)", "draw(layers, self.supernet_seed, 1)"),),
        "tests/test_glora_search.py", "seeded_draw",
    ),
    Mutant(
        "search_ignores_the_budget", "no candidate over search.max_params", "lorafam/adapters/glora_search.py",
        (("if params == 0 or (cfg.max_params is not None and params > cfg.max_params):", "if params == 0:"),),
        "tests/test_glora_search.py", "budget",
    ),
    Mutant(
        "subnet_takes_the_wrong_column", "the subnet computes what the supernet scored", "lorafam/adapters/glora_search.py",
        (('"vector": {"X": self.Xd[:, :1]}', '"vector": {"X": self.Xd[:, 1:2]}'),),
        "tests/test_glora_search.py", "fitness_equals",
    ),
    Mutant(
        "search_repeats_its_last_saved_generation", "a resumed search goes on where it stopped", "lorafam/adapters/glora_search.py",
        (('first = saved["generation"] + 1', 'first = saved["generation"]'),),
        "tests/test_glora_search.py", "killed and search",
    ),
]


def copy_checkout(target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(copy: Path, mutant: Mutant, timeout: float) -> tuple[int, str]:
    command = [str(PYTHON), "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", mutant.tests]
    if mutant.select:
        command += ["-k", mutant.select]
    env = os.environ | {"PYTHONPATH": str(copy)}
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    return proc.returncode, last


def apply(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise SystemExit(f"{mutant.name}: stale mutant, {old!r} found {text.count(old)} times in {mutant.file}")
        text = text.replace(old, new)
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:52s} {m.tests}{' -k ' + repr(m.select) if m.select else ''}")
        return 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="lorafam-mutants-") as tmp:
        clean = Path(tmp) / "clean"
        copy_checkout(clean)
        probe = subprocess.run([str(PYTHON), "-c", "import lorafam; print(lorafam.__file__)"], cwd=clean,
                               env=os.environ | {"PYTHONPATH": str(clean)}, capture_output=True, text=True)
        assert probe.stdout.strip().startswith(str(clean)), f"the copy's lorafam is not the one imported: {probe.stdout}"
        for mutant in chosen:
            start = time.monotonic()
            if not args.no_baseline:
                code, last = run_tests(clean, mutant, args.timeout)
                if code != 0:
                    rows.append((mutant, "CLEAN FAILS", last, time.monotonic() - start))
                    failed = True
                    print(f"{mutant.name}: the clean tree fails its tests ({last})", flush=True)
                    continue
            copy = Path(tmp) / mutant.name
            shutil.copytree(clean, copy)
            apply(copy, mutant)
            code, last = run_tests(copy, mutant, args.timeout)
            verdict = "caught" if code == 1 else ("SURVIVED" if code == 0 else f"error ({code})")
            failed |= verdict != "caught"
            rows.append((mutant, verdict, last, time.monotonic() - start))
            print(f"{mutant.name}: {verdict} ({last}, {time.monotonic() - start:.0f} s)", flush=True)
            shutil.rmtree(copy)
    print("\n| mutant | claim it breaks | tests | result |\n|---|---|---|---|")
    for mutant, verdict, last, _ in rows:
        where = f"`{mutant.tests}`" + (f" `-k '{mutant.select}'`" if mutant.select else "")
        print(f"| `{mutant.name}` | {mutant.why} | {where} | {verdict}: {last} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
