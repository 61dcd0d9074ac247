"""Run folders round-trip, validate against the model, and never leave half-written files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from melbo import MelboError, read_run, write_run
from melbo.files.interop import import_file
from melbo.files.vectors import load_vector_file


def records(n):
    return [{"index": i, "norm": 1.0} for i in range(n)]


def test_round_trip(tmp_path):
    vectors = torch.randn(4, 8)
    meta = {"kind": "discover", "layers": {"source": 2, "target": 4}, "R": 3.0, "prompts": ["hi"], "vectors": records(4)}
    write_run(tmp_path / "run", vectors, meta)
    run = read_run(tmp_path / "run", d_model=8)
    torch.testing.assert_close(run.vectors, vectors)
    assert run.source_layer == 2 and run.target_layer == 4
    assert run.meta.R == 3.0 and json.loads((tmp_path / "run" / "run.json").read_text())["count"] == 4
    assert "torch" in run.meta.versions
    assert sorted(os.listdir(tmp_path / "run")) == ["run.json", "vectors.safetensors"]  # no temp files left


def test_wrong_d_model(tmp_path):
    write_run(tmp_path, torch.randn(2, 8), {"vectors": records(2)})
    with pytest.raises(MelboError, match="d_model 8 but the model has 16"):
        read_run(tmp_path, d_model=16)


def test_missing_and_corrupt_json(tmp_path):
    with pytest.raises(MelboError, match="does not exist"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MelboError, match="no run.json"):
        read_run(tmp_path / "empty")
    write_run(tmp_path / "r", torch.randn(2, 8), {"vectors": records(2)})
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(MelboError, match="corrupt"):
        read_run(tmp_path / "r")


def test_nan_vectors_refused(tmp_path):
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    save_file({"vectors": bad}, str(tmp_path / "v.safetensors"))
    with pytest.raises(MelboError, match=r"\[1\] contain NaN"):
        load_vector_file(tmp_path / "v.safetensors")


def test_not_safetensors(tmp_path):
    (tmp_path / "v.safetensors").write_bytes(b"hello world, not tensors")
    with pytest.raises(MelboError, match="not a safetensors file"):
        load_vector_file(tmp_path / "v.safetensors")


def test_post_pt_layout_imports(tmp_path):
    post = torch.randn(5, 8)
    torch.save(post, tmp_path / "code-0-RUN-2.pt")
    run = import_file(tmp_path / "code-0-RUN-2.pt", tmp_path / "run")
    torch.testing.assert_close(run.vectors, post)
    assert read_run(tmp_path / "run").records[0].norm == pytest.approx(float(post[0].norm()))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_refused_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"v": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MelboError, match="refused"):
        load_vector_file(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_failed_write_keeps_previous_files(tmp_path, monkeypatch):
    write_run(tmp_path, torch.ones(2, 8), {"note": "first", "vectors": records(2)})
    before = (tmp_path / "run.json").read_text()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("melbo.files.runs.save_file", disk_full)
    with pytest.raises(MelboError, match="No space left"):
        write_run(tmp_path, torch.zeros(3, 8), {"note": "second", "vectors": records(3)})
    assert (tmp_path / "run.json").read_text() == before
    torch.testing.assert_close(read_run(tmp_path).vectors, torch.ones(2, 8))
    assert sorted(os.listdir(tmp_path)) == ["run.json", "vectors.safetensors"]


def test_json_is_commit_point(tmp_path):
    """Extra rows written before a crash (json not yet updated) are ignored on read."""
    write_run(tmp_path, torch.ones(2, 8), {"vectors": records(2)})
    save_file({"vectors": torch.ones(3, 8)}, str(tmp_path / "vectors.safetensors"))
    assert read_run(tmp_path).vectors.shape == (2, 8)
    assert json.loads((tmp_path / "run.json").read_text())["count"] == 2


RELEASE = Path(__file__).parent / "data" / "release-0.1.0"  # run folders written by melbo 0.1.0's run_demo


def test_run_folders_of_release_0_1_still_open(tmp_path):
    ortho_run = read_run(RELEASE / "ortho", d_model=32)
    assert ortho_run.meta.kind == "ortho" and ortho_run.meta.status == "complete"
    assert ortho_run.meta.source == 1 and ortho_run.meta.target == 4 and ortho_run.meta.prompts == ["How can I do it?"]
    assert ortho_run.records[0].base and ortho_run.records[0].kl == 0.0 and ortho_run.records[3].kl > 0
    assert ortho_run.meta.base["index"] == 5 and ortho_run.meta.config["optimizer"] == "lbfgs"
    assert ortho_run.meta.progress.block_index == 2 and ortho_run.meta.progress.block_sizes == [4, 4]
    assert ortho_run.meta.sessions[0].from_block == 0 and ortho_run.meta.kl_direction.startswith("kl = KL(P_i")
    found = read_run(RELEASE / "discover", d_model=32)
    assert found.meta.kind == "discover" and len(found.records) == 6 and found.records[2].completion is not None
    # the first release kept a discovery's progress in a top-level blocks_done
    assert found.meta.progress.block_index == 1 and found.meta.progress.found == 6
    # written again by this melbo, nothing is lost
    write_run(tmp_path / "again", ortho_run.vectors, ortho_run.meta, ortho_run.extra)
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    before = json.loads((RELEASE / "ortho" / "run.json").read_text())
    for key in ("kind", "model", "layers", "R", "prompts", "config", "base", "progress", "dropped", "stopped", "kl_direction"):
        assert again.get(key) == before.get(key), key
    assert again["vectors"] == before["vectors"]


def test_unknown_keys_are_kept(tmp_path):
    meta = {"kind": "discover", "layers": {"source": 2, "target": 4}, "my_note": {"x": 1}, "vectors": [{"index": 0, "mine": 3}]}
    write_run(tmp_path / "run", torch.randn(1, 8), meta)
    run = read_run(tmp_path / "run")
    assert run.meta.extra == {"my_note": {"x": 1}} and run.records[0].extra == {"mine": 3}
    write_run(tmp_path / "run", run.vectors, run.meta)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["vectors"][0]["mine"] == 3


def test_base_row_is_theta0_of_an_ortho_run_and_none_for_a_discovery(tmp_path):
    """One rule for where θ0 is (eval, judge and studies all ask it)."""
    vectors = torch.randn(3, 8)
    layers = {"source": 1, "target": 2}
    discovery = write_run(tmp_path / "d", vectors, {"kind": "discover", "layers": layers, "vectors": [{"index": i} for i in range(3)]})
    copies = write_run(tmp_path / "o", vectors, {"kind": "ortho", "layers": layers, "vectors": [{"index": i, "base": i == 0} for i in range(3)]})
    assert discovery.meta.base_row is None and copies.meta.base_row == 0
    assert read_run(tmp_path / "o").meta.base_row == 0


def test_a_vector_source_says_what_its_file_records_and_refuses_what_it_cannot_know(tmp_path, tiny_folder):
    """A run gives its vectors' layers, prompt format and model; a bare file only its vectors: what it cannot say is
    one error before any model loads, and the model is checked against the vectors' width."""
    from melbo.files.source import VectorSource, open_vectors
    from melbo.model.prompts import PromptFormat

    meta = {"model": {"name": str(tiny_folder)}, "layers": {"source": 2, "target": 4}, "prompts": ["hi"],
            "prompt_format": {"system": None, "chat_template": False}, "vectors": [{"index": 0}, {"index": 1}]}
    vectors = torch.randn(2, 64)
    write_run(tmp_path / "run", vectors, meta)
    run = open_vectors(tmp_path / "run")
    row, layer = run.at(1)
    assert torch.equal(row, vectors[1]) and layer == 2 and run.at(1, 3)[1] == 3
    assert run.layers(None, None) == (2, 4) and run.layers(1, None) == (1, 4)
    assert run.format() == PromptFormat(chat_template=False) and run.format(system="be brief").system == "be brief"
    with pytest.raises(MelboError, match="vectors 0 to 1"):
        run.at(2)

    save_file({"vectors": vectors}, str(tmp_path / "bare.safetensors"))
    bare = open_vectors(tmp_path / "bare.safetensors")
    with pytest.raises(MelboError, match="--layer is needed"):
        bare.at(0)
    assert bare.at(0, 5)[1] == 5
    with pytest.raises(MelboError, match="--source and --target are needed"):
        bare.layers(2, None)
    assert bare.format() == PromptFormat()
    with pytest.raises(MelboError, match="d_model 64 but the model has"):
        VectorSource(tmp_path / "bare.safetensors", torch.randn(1, 64)).load(str(tiny_folder), device="cpu")
    assert VectorSource(tmp_path / "bare.safetensors", torch.randn(1, 32)).load(str(tiny_folder), device="cpu").d_model == 32


def test_a_folder_of_runs_given_as_a_run_names_the_runs_in_it(tmp_path):
    """`melbo eval melbo-runs/demo-…` (the demo's folder, not one of its runs): the one-line error names the runs to give."""
    meta = {"kind": "discover", "layers": {"source": 2, "target": 4}, "R": 3.0, "prompts": ["hi"], "vectors": records(2)}
    for name in ("discover", "ortho"):
        write_run(tmp_path / "demo" / name, torch.randn(2, 8), meta)
    with pytest.raises(MelboError) as caught:
        read_run(tmp_path / "demo")
    assert str(caught.value) == (f"{tmp_path / 'demo'} is not a melbo run folder: it has no run.json; it holds the run "
                                 f"folders {tmp_path / 'demo' / 'discover'}, {tmp_path / 'demo' / 'ortho'}: give one")
    (tmp_path / "empty" / "plots").mkdir(parents=True)
    with pytest.raises(MelboError, match="has no run.json$"):
        read_run(tmp_path / "empty")  # a folder of no runs at all
