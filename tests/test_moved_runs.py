"""Runs that moved, or whose model file moved, still find their model; runs made with raw prompts keep them."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here

from melbo.errors import MelboError
from melbo.files.runs import read_run, write_run
from melbo.model.loading import cache_root, embedded_gguf_path, locate_model
from melbo.model.prompts import PromptFormat


def test_a_moved_gguf_is_found_by_its_recorded_path_then_by_its_hash(tmp_path, monkeypatch):
    gguf = embedded_gguf_path()
    from melbo.model.loading import file_sha256

    sha = file_sha256(gguf)
    assert (cache_root() / "gguf" / sha[:32] / "config.json").is_file()  # converted once by the session fixture
    moved = {"name": "model.gguf", "file": str(gguf), "sha256": sha}
    monkeypatch.chdir(tmp_path)  # "model.gguf" is not here
    assert locate_model(moved) == str(gguf)  # the absolute path run.json recorded
    gone = {**moved, "file": str(tmp_path / "gone" / "model.gguf")}
    assert locate_model(gone) == str(cache_root() / "gguf" / sha[:32])  # melbo's cache, by hash
    with pytest.raises(MelboError, match="pass --model PATH"):
        locate_model({**gone, "sha256": "0" * 64})
    assert locate_model({"name": "Qwen/Qwen2-0.5B"}) == "Qwen/Qwen2-0.5B" and locate_model({"name": "smollm2"}) == "smollm2"


def test_a_run_of_a_model_loaded_in_python_asks_for_model_in_one_line(char_tokenizer, tiny_folder, tmp_path):
    """LoadedModel(model, tokenizer, "my-model") records no file, folder or Hub id: the shell said "cannot load model
    'my-model': it is not a local folder or file, … nor on the Hugging Face Hub", not what to do."""
    from conftest import make_tiny_model

    from melbo import DiscoverConfig, LoadedModel, discover

    mine = LoadedModel(make_tiny_model("llama", initializer_range=0.3), char_tokenizer, "my-model")
    run = discover(mine, ["hi there"], DiscoverConfig(count=2, radius=3.0, source=1, target=4, steps=2, block=2, completion_tokens=4),
                   out=tmp_path / "mine", progress=False)
    assert run.meta.model["name"] == "my-model" and not {"id", "path", "file", "sha256"} & run.meta.model.keys()
    with pytest.raises(MelboError, match=r"^the model of the run was loaded in Python as 'my-model' \(LlamaForCausalLM\), and nothing "):
        locate_model(run.meta.model)
    assert_one_line_error(melbo("eval", str(run.path)), "pass --model FOLDER, FILE or Hub id (the same weights)")
    assert not (run.path / "eval.json").exists()
    assert melbo("eval", str(run.path), "--model", str(tiny_folder), "--max-new-tokens", "2").returncode == 0


@pytest.mark.slow
def test_generate_on_a_moved_raw_prompt_run(tmp_path):
    """A run made with --no-chat-template from a GGUF file that has since moved: generate finds the model by hash and
    formats its prompt raw, as the run was made."""
    copy = tmp_path / "my" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy(embedded_gguf_path(), copy)
    vectors = torch.randn(1, 576)
    vectors = 20 * vectors / vectors.norm()
    from melbo.model.loading import file_sha256

    meta = {"kind": "discover", "model": {"name": str(copy), "file": str(copy), "sha256": file_sha256(copy)},
            "layers": {"source": 8, "target": 20}, "prompts": ["The capital of France is"],
            "prompt_format": {"system": None, "chat_template": False}, "vectors": [{"index": 0}]}
    run = write_run(tmp_path / "run", vectors, meta)
    assert read_run(run.path).meta.prompt_format == PromptFormat(system=None, chat_template=False)
    copy.unlink()
    result = melbo("generate", str(run.path), "-p", "The capital of France is", "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "unsteered" in line)
    assert [cell.strip() for cell in header.strip("┃│ ").split("┃" if "┃" in header else "│")] == ["unsteered", "steered"]


def test_every_command_that_reads_a_run_takes_its_raw_prompt_format(tmp_path):
    """A base model without a chat template (like Gemma 3 270M): a run made with --no-chat-template works with
    generate --run and ortho RUN without saying --no-chat-template again."""
    from conftest import make_char_tokenizer, make_tiny_model

    folder = tmp_path / "base-model"
    make_tiny_model("llama", initializer_range=0.3).save_pretrained(folder)
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    meta = {"kind": "discover", "model": {"name": str(folder), "path": str(folder)}, "layers": {"source": 1, "target": 4},
            "prompts": ["The sky is"], "prompt_format": {"system": None, "chat_template": False}, "vectors": [{"index": 0}, {"index": 1}]}
    run = write_run(tmp_path / "run", 3 * torch.randn(2, 32), meta)
    result = melbo_here("generate", "--run", str(run.path), "-p", "The sky is", "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    result = melbo_here("ortho", str(run.path), "--index", "1", "--count", "2", "--block", "2", "--steps", "2", "--completion-tokens", "3",
                   "--out", str(tmp_path / "o"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert read_run(tmp_path / "o").meta.prompt_format.chat_template is False
    result = melbo_here("generate", "--run", str(run.path), "--chat-template", "--device", "cpu")
    assert result.returncode == 2 and "no chat template" in result.stderr  # told otherwise: the template, which it lacks
