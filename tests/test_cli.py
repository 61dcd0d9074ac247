"""The command line as a user meets it: real subprocesses, one-line errors, exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here

from melbo.files.runs import read_run, write_run


def test_help_lists_commands_in_the_order_of_the_work_with_their_whole_first_sentence():
    """`melbo --help > file`: demo, info, discover and ortho first (not the modules' alphabetical order), and no
    description cut at one line with "..."; a terminal's panel lists them in the same order."""
    from melbo.cli.app import HELP_ORDER

    for columns in (None, "120"):
        result = melbo("--help", columns=columns)
        assert result.returncode == 0, result.stderr
        listed = re.findall(r"^(?:  |│ )([a-z][a-z-]+) ", result.stdout.split("Commands")[1], re.MULTILINE)
        assert listed == list(HELP_ORDER), (columns, listed)
    plain = melbo("--help", columns=None).stdout
    assert not re.search(r"\.\.\.$", plain.split("Commands")[1], re.MULTILINE), plain
    assert "pick the clearest, find orthogonal copies of it, evaluate" in " ".join(plain.split())


def test_help_into_a_file_is_plain_text_at_its_log_width():
    """`melbo ortho --help > file` (no terminal, COLUMNS unset): click's plain help 120 columns wide, no panels drawn at
    80 columns with each option's help in a narrow column; a terminal keeps rich's panels."""
    from melbo.cli.app import HELP_LOG_WIDTH

    result = melbo("ortho", "--help", columns=None)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not any(char in result.stdout for char in "╭│╰"), result.stdout[:400]
    assert max(len(line) for line in lines) <= HELP_LOG_WIDTH
    block = next(line for line in lines if line.lstrip().startswith("--block "))
    assert "Vectors optimised together (fast: 16, 32 in runs of 128 copies or more" in block
    assert "│" in melbo("ortho", "--help").stdout  # COLUMNS set: rich, as in a terminal


def test_generate_needs_a_vector():
    assert_one_line_error(melbo_here("generate"), "give exactly one of a run folder (melbo generate RUN --index I) or --vector FILE")


def test_generate_missing_run(tmp_path):
    """RUN is an argument, as in every other command; melbo 0.1's --run RUN still works, and both at once is an error."""
    assert_one_line_error(melbo_here("generate", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(melbo_here("generate", "--run", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(melbo_here("generate", str(tmp_path / "a"), "--run", str(tmp_path / "b")), "give the run once")
    assert_one_line_error(melbo_here("generate", str(tmp_path / "a"), "--vector", str(tmp_path / "v.pt")), "give exactly one of")


def test_generate_missing_vector_file(tmp_path):
    assert_one_line_error(melbo_here("generate", "--vector", str(tmp_path / "v.pt"), "--layer", "3"), "does not exist")


@pytest.mark.slow
def test_info_prints_layer_profile():
    result = melbo("info")
    assert result.returncode == 0, result.stderr
    assert "30 layers" in result.stdout and "d_model 576" in result.stdout
    assert "attention sink" in result.stdout  # the flag column is named, not a blank header
    assert "top 3 dims' share of ‖h‖²" in result.stdout and "massive activations" not in result.stdout  # SmolLM2: ~50 %
    assert "×173 the median" in result.stdout  # SmolLM2's first-token attention sink is flagged (layer 11)
    assert "(about a third of the way in: 8 here), t (about two thirds in: 20 here)" in " ".join(result.stdout.split())


@pytest.mark.slow
def test_generate_side_by_side_and_bad_inputs(tmp_path):
    torch.manual_seed(0)
    vectors = torch.randn(2, 576)
    vectors = 60 * vectors / vectors.norm(dim=1, keepdim=True)
    meta = {"model": {"name": "smollm2"}, "layers": {"source": 8, "target": 20}, "vectors": [{"index": 0}, {"index": 1}]}
    write_run(tmp_path / "run", vectors, meta)
    result = melbo("generate", str(tmp_path / "run"), "--index", "1", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "unsteered" in line)
    assert [cell.strip() for cell in header.strip("┃│ ").split("┃" if "┃" in header else "│")] == ["unsteered", "steered"]
    row = next(line for line in result.stdout.splitlines() if line.startswith("│") and line.strip("│ "))
    plain, steered = (cell.strip() for cell in row.strip("│").split("│"))
    assert plain and steered and plain != steered  # the vector (norm 60 at layer 8) changes the text
    from melbo.files.interop import export_vectors

    (gguf,) = export_vectors(read_run(tmp_path / "run"), tmp_path / "v1.gguf", "gguf", [1])  # direction.8
    from_file = melbo_here("generate", "--vector", str(gguf), "--max-new-tokens", "8")  # its layer from the file
    from_run = melbo_here("generate", str(tmp_path / "run"), "--index", "1", "--max-new-tokens", "8")
    assert from_file.returncode == 0 and from_run.returncode == 0, from_file.stderr + from_run.stderr
    assert "vector 0 (norm 60.00) added after layer 8" in from_file.stdout
    assert from_file.stdout.splitlines()[1:] == from_run.stdout.splitlines()[1:]  # the same completions as the run's vector
    assert_one_line_error(melbo_here("generate", "--run", str(tmp_path / "run"), "--index", "5"), "vectors 0 to 1")
    assert_one_line_error(melbo_here("generate", "--run", str(tmp_path / "run"), "--layer", "30"), "out of range")
    write_run(tmp_path / "narrow", torch.randn(1, 100), {"layers": {"source": 8, "target": 20}, "vectors": [{"index": 0}]})
    assert_one_line_error(melbo_here("generate", "--run", str(tmp_path / "narrow")), "d_model 100 but the model has 576")


def test_discover_then_ortho_from_the_shell(tmp_path, tiny_folder):
    """The main path from the shell, on a tiny model (the demo's shell test runs it on SmolLM2): discover as a real
    process, the commands after it through the same entry point in this process."""
    model = ["--model", str(tiny_folder), "--device", "cpu"]
    disc = tmp_path / "disc"
    result = melbo("discover", "-k", "2", "--block", "2", "--steps", "3", "-s", "1", "-t", "4", "-R", "3", "--completion-tokens", "4", "--out", str(disc), *model)
    assert result.returncode == 0, result.stderr
    assert (disc / "run.json").is_file() and "run folder" in result.stdout
    assert_one_line_error(melbo_here("discover", "-k", "2", "--out", str(disc), *model), "already holds a run")
    orth = tmp_path / "orth"
    result = melbo_here("ortho", str(disc), "--index", "1", "-k", "2", "--block", "2", "--steps", "3", "--completion-tokens", "4", "--out", str(orth))
    assert result.returncode == 0, result.stderr
    run = read_run(orth, d_model=32)
    assert run.vectors.shape == (3, 32) and run.meta.base["index"] == 1 and run.meta.source == 1 and run.meta.target == 4
    torch.testing.assert_close(run.vectors[0], read_run(disc).vectors[1])
    for command, stored, shown in (
        (["eval", str(orth), "--max-new-tokens", "4", "--prompt", "Hi!"], "eval.json", "generalisation over 1 held-out"),
        (["compose", str(orth), "--k", "1,2", "--max-new-tokens", "4"], "compose.json", "k=2 mean×√k"),
        (["probe", str(orth), "--prompt", "Write a Python function that adds two numbers.", "--max-new-tokens", "6", "--random-directions", "16"], "probe.json", "random directions: mean |cos|"),
    ):
        result = melbo_here(*command)
        assert result.returncode == 0, result.stderr
        assert (orth / stored).is_file() and shown in result.stdout, result.stdout
    seed = tmp_path / "seed"
    result = melbo_here("ortho", str(disc), "--mode", "seed", "--count", "1", "--steps", "2", "--completion-tokens", "0", "--out", str(seed))
    assert result.returncode == 0, result.stderr
    assert read_run(seed).meta.config["mode"] == "seed"


@pytest.mark.slow
def test_calibrate_prints_the_table_and_the_choice():
    result = melbo("discover", "--calibrate", "--radii", "10,400", "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "Choosing R" in result.stdout and "R = " in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and rows[0].split("│")[1].strip().endswith("10") and rows[1].split("│")[1].strip().endswith("400")


def test_import_melbo_does_not_import_torch_until_a_name_is_used():
    """`melbo --help` and a mistyped option answer at once: the package's names load torch on first use."""
    code = (
        "import sys, melbo; assert 'torch' not in sys.modules, 'import melbo imported torch'; "
        "from melbo import *; assert callable(load_model) and callable(find_blocks) and 'torch' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def no_bfloat16_units(monkeypatch) -> None:
    """This process's CPU reads as one without bfloat16 units (an AVX2 CPU) wherever melbo asks: for the warning
    (fastpath) and for what precision auto becomes (the engines import the name), whatever CPU runs the test."""
    import melbo.engines.discover
    import melbo.engines.ortho
    import melbo.model.fastpath

    for module in (melbo.model.fastpath, melbo.engines.discover, melbo.engines.ortho):
        monkeypatch.setattr(module, "bfloat16_is_fast", lambda device: False)


def test_bfloat16_without_bfloat16_units_warns_in_one_line(tmp_path, tiny_folder, monkeypatch):
    """Asked for bfloat16 products where the device has no bfloat16 units (an AVX2 CPU: about 36× slower than float32
    there), discover and ortho say so in one line and go on; auto and float32 say nothing."""
    no_bfloat16_units(monkeypatch)
    model = ["--model", str(tiny_folder), "--device", "cpu"]
    small = ["-k", "2", "--block", "2", "--steps", "2", "-s", "1", "-t", "4", "-R", "3", "--completion-tokens", "2", *model]
    warned = "melbo: warning: bfloat16 products on a device without bfloat16 units"
    slow = melbo_here("discover", *small, "--precision", "bfloat16", "--out", str(tmp_path / "bf16"))
    assert slow.returncode == 0, slow.stderr
    assert [line for line in slow.stderr.splitlines() if warned in line] and "36× slower" in slow.stderr
    assert read_run(tmp_path / "bf16").meta.config["precision"] == "bfloat16"  # it warns, and does what was asked
    plain = melbo_here("discover", *small, "--out", str(tmp_path / "auto"))
    assert plain.returncode == 0 and warned not in plain.stderr, plain.stderr
    assert read_run(tmp_path / "auto").meta.config["precision"] == "float32"
    ortho = ["--count", "2", "--block", "2", "--steps", "2", "--completion-tokens", "2"]
    for flags, warns in ((["--warmup-precision", "bfloat16", "--prompt-set", "neutral"], True), (["--precision", "float32"], False)):
        result = melbo_here("ortho", str(tmp_path / "auto"), *ortho, *flags, "--out", str(tmp_path / f"ortho{warns}"))
        assert result.returncode == 0, result.stderr
        assert (warned in result.stderr) is warns, result.stderr


def test_a_study_that_asks_for_bfloat16_without_bfloat16_units_warns_once(tmp_path, tiny_folder, monkeypatch):
    """`melbo study` run in this process gives discover's and ortho's warning once, however many units ask for it."""
    import json

    no_bfloat16_units(monkeypatch)
    spec = tmp_path / "bf16.toml"
    spec.write_text(f"""
name = "bf16"
[model]
name = {json.dumps(str(tiny_folder))}
device = "cpu"
[prompts]
prompts = ["How can I do it?"]
[discover]
count = 2
block = 2
steps = 2
source = 1
target = 4
completion_tokens = 2
precision = "bfloat16"
[sweep]
"discover.radius" = [2.0, 3.0]
""")
    result = melbo_here("study", str(spec), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("melbo: warning: bfloat16 products")]
    assert len(warnings) == 1, result.stderr
    spec.write_text(spec.read_text().replace('precision = "bfloat16"', 'precision = "auto"'))
    result = melbo_here("study", str(spec), "--out", str(tmp_path / "auto"))
    assert result.returncode == 0 and "melbo: warning" not in result.stderr, result.stderr
