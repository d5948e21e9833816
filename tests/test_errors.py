"""Malformed input -> exit code 2, exactly one line on stderr, nothing written.

One table of bad recipes, data files and run folders, each run through the real CLI (in-process;
a few also as a subprocess, to see the real stderr and exit code). The README's troubleshooting
section lists the same messages.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tinyrun import cli, cli_subprocess, make_model_folder, make_text_data, write_recipe

from lorafam.adapters import VARIANTS


@dataclass
class Env:
    tmp: Path
    model: Path
    data: Path
    run: Path  # a finished run (read-only: cases that damage one copy it first)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recipe(self, edit: Callable[[dict], Any] | None = None, name: str = "recipe.yaml") -> Path:
        path = write_recipe(self.tmp / name, self.model, self.data, self.out, train={"max_steps": 2, "save_every": None})
        if edit is not None:
            raw = yaml.safe_load(path.read_text())
            edit(raw)
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def data_file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def copy_run(self) -> Path:
        return Path(shutil.copytree(self.run, self.tmp / "run_copy"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    model, data = make_model_folder(root / "model"), make_text_data(root / "train.jsonl")
    recipe = write_recipe(root / "r.yaml", model, data, root / "run", train={"max_steps": 2, "save_every": None})
    torch.set_num_threads(1)
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    return model, data, root / "run"


@pytest.fixture
def env(tmp_path, finished) -> Env:
    return Env(tmp_path, *finished)


def put(raw: dict, key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = raw
    for section in sections:
        node = node[section]
    node[last] = value


def drop(raw: dict, key: str) -> None:
    *sections, last = key.split(".")
    node = raw
    for section in sections:
        node = node[section]
    del node[last]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# id -> (setup(env) -> CLI args, expected stderr line). In the expected line {tmp}, {model}, {run}
# and {cwd} stand for the paths; a trailing "..." compares the prefix only (for messages that list
# what exists, e.g. every registered variant or every allowed key).
CASES: dict[str, tuple[Callable[[Env], list[Any]], str]] = {
    # ---- recipes
    "recipe file missing": (
        lambda e: ["train", e.tmp / "nope.yaml"],
        "error: recipe {tmp}/nope.yaml not found; pass the path of a YAML recipe (see recipes/)",
    ),
    "recipe not YAML": (
        lambda e: ["train", e.data_file("bad.yaml", "model: [unclosed\n")],
        "error: {tmp}/bad.yaml: not valid YAML at line 2: ...",
    ),
    "recipe not a mapping": (
        lambda e: ["train", e.data_file("list.yaml", "- a\n- b\n")],
        "error: {tmp}/list.yaml: a recipe is a YAML mapping with model, adapter, data and train sections",
    ),
    "unknown key": (
        lambda e: ["train", e.recipe(lambda r: put(r, "train.lrr", 0.1))],
        "error: {tmp}/recipe.yaml: train.lrr: unknown key (allowed here: max_steps, epochs, batch_size, ...",
    ),
    "unknown section": (
        lambda e: ["train", e.recipe(lambda r: put(r, "trainer", {}))],
        "error: {tmp}/recipe.yaml: trainer: unknown key (allowed here: model, adapter, data, train, preference, output_dir)",
    ),
    "wrong type": (
        lambda e: ["train", e.recipe(lambda r: put(r, "train.batch_size", "eight"))],
        "error: {tmp}/recipe.yaml: train.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'eight')",
    ),
    "missing required key": (
        lambda e: ["train", e.recipe(lambda r: drop(r, "model.name"))],
        "error: {tmp}/recipe.yaml: model.name: required key is missing",
    ),
    "unknown variant": (
        lambda e: ["train", e.recipe(lambda r: put(r, "adapter.variant", "lorax"))],
        "error: {tmp}/recipe.yaml: adapter.variant: unknown variant 'lorax'; choose one of " + ", ".join(VARIANTS),
    ),
    "r below 1": (
        lambda e: ["train", e.recipe(lambda r: put(r, "adapter.r", 0))],
        "error: {tmp}/recipe.yaml: adapter.r: Input should be greater than or equal to 1 (got 0)",
    ),
    "bad --set": (
        lambda e: ["train", e.recipe(), "--set", "train.lr"],
        "error: --set 'train.lr': expected section.key=value, e.g. --set train.lr=1e-4",
    ),
    "--set into a value": (
        lambda e: ["train", e.recipe(), "--set", "output_dir.x=1"],
        "error: --set 'output_dir.x=1': output_dir is not a section",
    ),
    "model folder missing": (
        lambda e: ["train", e.recipe(lambda r: put(r, "model.name", str(e.tmp / "no-model")))],
        "error: model.name: folder {tmp}/no-model does not exist; give a model folder, a hub id, or a packaged alias: ...",
    ),
    "model folder without config.json": (
        lambda e: ["train", e.recipe(lambda r: put(r, "model.name", str(e.tmp)))],
        "error: model.name: folder {tmp} has no config.json; give a Hugging Face model folder",
    ),
    "target_modules matching nothing": (
        lambda e: ["train", e.recipe(lambda r: put(r, "adapter.target_modules", ["qkv"]))],
        "error: adapter.target_modules ['qkv'] matches no linear layer in this model; it has: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ),
    "output_dir holds a different run": (
        lambda e: ["train", e.recipe(lambda r: (put(r, "output_dir", str(e.run)), put(r, "train.lr", 0.5)))],
        "error: output_dir {run} holds a different run (its recipe.yaml differs at train.lr: saved 0.01, now 0.5); "
        "choose another with --set output_dir=... or pass --overwrite to replace it",
    ),
    "output_dir holds something else": (
        lambda e: ["train", e.recipe(lambda r: put(r, "output_dir", str(e.model)))],
        "error: output_dir {model} is not empty and holds no lorafam run; choose another with --set output_dir=... or pass --overwrite",
    ),
    "output_dir is a file": (
        lambda e: ["train", e.recipe(lambda r: put(r, "output_dir", str(e.data)))],
        "error: output_dir {data} is a file; choose a folder path with --set output_dir=...",
    ),
    # ---- data files
    "data file missing": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.tmp / "nope.jsonl")))],
        "error: data.train: file {tmp}/nope.jsonl not found; give a path to a .json/.jsonl/.csv/.parquet file (relative to {cwd}), ...",
    ),
    "data file type unsupported": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.data_file("rows.txt", "hello\n"))))],
        "error: data.train: {tmp}/rows.txt: unsupported file type; use .json, .jsonl, .csv or .parquet (optionally compressed with .gz)",
    ),
    "data file not JSON": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.data_file("broken.jsonl", '{"text": "a"}\n{"text": \n'))))],
        "error: data.train: could not read {tmp}/broken.jsonl: JSON parse error: Invalid value. in row 1",
    ),
    "data file empty": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.data_file("empty.jsonl", ""))))],
        "error: data.train: {tmp}/empty.jsonl is an empty file; it needs one example per row",
    ),
    "missing column": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.format", "alpaca"))],
        "error: data.train: format alpaca needs column instruction and output; the data has columns ['text']",
    ),
    "columns fit no format": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.data_file("q.jsonl", '{"question": "a"}\n' * 4))))],
        "error: data.train: cannot tell the data format from columns ['question']; expected messages (chat), ...",
    ),
    "no usable rows": (
        lambda e: ["train", e.recipe(lambda r: put(r, "data.train", str(e.data_file("blank.jsonl", '{"text": " "}\n' * 4))))],
        "error: data.train: no usable rows in {tmp}/blank.jsonl (3 read: 3 empty); check data.format (text), data.max_length (24) and the rows themselves",
    ),
    # ---- run folders (merge / eval)
    "merge: run folder missing": (
        lambda e: ["merge", e.tmp / "no-run", "--output", e.tmp / "merged"],
        "error: run folder {tmp}/no-run does not exist; pass the output_dir of a lorafam train run",
    ),
    "eval: run folder missing": (
        lambda e: ["eval", e.tmp / "no-run"],
        "error: run folder {tmp}/no-run does not exist; pass the output_dir of a lorafam train run",
    ),
    "merge: not a run folder": (
        lambda e: ["merge", e.model, "--output", e.tmp / "merged"],
        "error: {model} is not a lorafam run folder (no recipe.yaml); pass a train output_dir",
    ),
    "eval: not a run folder": (
        lambda e: ["eval", e.model],
        "error: {model} is not a lorafam run folder (no recipe.yaml); pass a train output_dir",
    ),
    "merge: unfinished run": (
        lambda e: ["merge", unfinished(e), "--output", e.tmp / "merged"],
        "error: {tmp}/run_copy has no adapter_model.safetensors: the run did not finish; resume it with "
        "`lorafam train {tmp}/run_copy/recipe.yaml --resume`",
    ),
    "merge: truncated adapter": (
        lambda e: ["merge", truncated(e), "--output", e.tmp / "merged"],
        "error: {tmp}/run_copy/adapter_model.safetensors is corrupt or truncated (...",
    ),
    "eval: truncated adapter": (
        lambda e: ["eval", truncated(e)],
        "error: {tmp}/run_copy/adapter_model.safetensors is corrupt or truncated (...",
    ),
    "merge: --output not empty": (
        lambda e: ["merge", e.run, "--output", e.model],
        "error: --output {model} exists and is not empty; choose a new folder",
    ),
    "eval: --set on a run folder": (
        lambda e: ["eval", e.run, "--set", "train.lr=1"],
        "error: eval RUN_DIR takes no --set: the run's recipe is fixed; eval a recipe instead",
    ),
}


def unfinished(e: Env) -> Path:
    run = e.copy_run()
    (run / "adapter_model.safetensors").unlink()
    return run


def truncated(e: Env) -> Path:
    run = e.copy_run()
    truncate(run / "adapter_model.safetensors")
    return run


def expand(expected: str, e: Env) -> str:
    return expected.format(tmp=e.tmp, model=e.model, run=e.run, data=e.data, cwd=Path.cwd())


def snapshot(*folders: Path) -> list[tuple[str, int, int]]:
    files = [p for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def check_one_line(stderr: str, expected: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    assert "Traceback" not in stderr
    if expected.endswith("..."):
        assert lines[0].startswith(expected[:-3]), lines[0]
    else:
        assert lines[0] == expected


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, env):
    setup, expected = CASES[case]
    args = setup(env)
    before = snapshot(env.run, env.model, env.tmp)
    result = cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    check_one_line(result.stderr, expand(expected, env))
    assert not env.out.exists(), "a recipe error created output_dir"
    assert not (env.tmp / "merged").exists() and not list(env.tmp.glob(".merged*"))
    assert snapshot(env.run, env.model, env.tmp) == before, "an error run changed files"


@pytest.mark.parametrize("case", ["unknown key", "merge: truncated adapter"])
def test_bad_input_through_a_real_process(case, env):
    setup, expected = CASES[case]
    result = cli_subprocess(*setup(env))
    assert result.returncode == 2
    check_one_line(result.stderr, expand(expected, env))
    assert result.stdout == ""
