"""Export to llama.cpp / repeng GGUF, steering-vectors, .pt and .npy, and import back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from melbo import MelboError, add_to_residual, read_run, residual_after, write_run
from melbo.files.interop import export_vectors, import_file, indices_name, parse_indices, read_control_vector


@pytest.fixture
def run(tmp_path):
    vectors = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    meta = {"model": {"name": "tiny", "model_type": "llama"}, "layers": {"source": 2, "target": 4}, "vectors": [{"index": i} for i in range(4)]}
    return write_run(tmp_path / "run", vectors, meta)


def test_parse_indices():
    assert parse_indices("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_indices("all", 3) == [0, 1, 2]
    with pytest.raises(MelboError, match="vectors 0 to 3"):
        parse_indices("7", 4)
    with pytest.raises(MelboError, match="a range like"):
        parse_indices("x", 4)


def test_gguf_is_a_llama_cpp_control_vector(run, tmp_path):
    import gguf

    (path,) = export_vectors(run, tmp_path / "v.gguf", "gguf", [1], scale=2.0)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.2" and tensor.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.array(tensor.data).reshape(-1), (2.0 * run.vectors[1]).numpy(), rtol=1e-6)
    directions, hint = read_control_vector(path)
    assert hint == "llama" and list(directions) == [2]


def test_repeng_format_is_the_same_gguf(run, tmp_path):
    """repeng 0.4 pins numpy<2 and fails to import beside numpy 2 (np.float_), so its reader can't run here;
    this checks the file the way ControlVector.import_gguf reads it: model_hint, then direction.N tensors."""
    import gguf
    import numpy as np

    export_vectors(run, tmp_path / "b.gguf", "repeng", [0])
    reader = gguf.GGUFReader(str(tmp_path / "b.gguf"))  # the gguf library's own reader, not melbo's
    fields = dict(reader.fields)

    def value(name: str):
        return fields[name].parts[fields[name].data[0]]

    assert bytes(value("general.architecture")).decode() == "controlvector" and bytes(value("controlvector.model_hint")).decode() == "llama"
    assert int(value("controlvector.layer_count")[0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.2"
    np.testing.assert_allclose(np.asarray(tensor.data, dtype=np.float32).reshape(-1), run.vectors[0].numpy(), rtol=0, atol=0)


def test_layer_zero_cannot_go_to_llama_cpp(run, tmp_path):
    with pytest.raises(MelboError, match="layer 0"):
        export_vectors(run, tmp_path / "v.gguf", "gguf", [0], layer=0)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_a_scale_that_is_not_finite_writes_nothing(run, tmp_path, scale):
    with pytest.raises(MelboError, match="finite"):
        export_vectors(run, tmp_path / "v.gguf", "gguf", [0], scale)
    assert not (tmp_path / "v.gguf").exists()


def test_several_control_vectors_go_to_a_folder(run, tmp_path):
    written = export_vectors(run, tmp_path / "many", "gguf", [0, 3])
    assert [p.name for p in written] == ["vector-0000.gguf", "vector-0003.gguf"]


def test_a_folder_as_out_gets_files_named_for_the_run(run, tmp_path, monkeypatch):
    """`--out exports/` or an existing folder: one vector or a pt/npy file goes inside it, named for the run and the
    indices (it used to become a file named `exports`, or fail on a temporary name); no --out writes here, several
    control vectors in `RUN-0-2/` (not in a folder named `RUN-0-2.gguf`)."""
    (tmp_path / "existing").mkdir()
    assert export_vectors(run, tmp_path / "existing", "gguf", [1]) == [tmp_path / "existing" / "run-1.gguf"]
    assert export_vectors(run, f"{tmp_path / 'new'}/", "npy", [0, 1, 2]) == [tmp_path / "new" / "run-0-2.npy"]
    assert export_vectors(run, tmp_path / "existing", "gguf", [0, 2]) == [tmp_path / "existing" / f"vector-000{i}.gguf" for i in (0, 2)]
    monkeypatch.chdir(tmp_path)
    assert export_vectors(run, None, "pt", [0, 1, 2, 3]) == [Path("run-all.pt")]
    assert export_vectors(run, None, "gguf", [3]) == [Path("run-3.gguf")]
    assert export_vectors(run, None, "steering-vectors", [0, 1, 3]) == [Path("run-0_1_3") / f"vector-000{i}.pt" for i in (0, 1, 3)]
    assert all(p.is_file() for p in (Path("run-all.pt"), Path("run-3.gguf"), Path("run-0_1_3/vector-0003.pt")))
    assert indices_name(list(range(9)), 20) == "0-8" and indices_name([1, 5, 6, 7, 9, 11, 13], 20) == "7-vectors"


@pytest.mark.parametrize("fmt", ["pt", "npy"])
def test_matrix_formats_round_trip(run, tmp_path, fmt):
    (path,) = export_vectors(run, tmp_path / "m", fmt, [0, 2])
    imported = import_file(path, tmp_path / "back", layer=2)
    torch.testing.assert_close(imported.vectors, run.vectors[[0, 2]])
    assert read_run(tmp_path / "back").source_layer == 2


@pytest.mark.parametrize("fmt", ["gguf", "steering-vectors"])
def test_control_formats_round_trip(run, tmp_path, fmt):
    (path,) = export_vectors(run, tmp_path / f"v{'.gguf' if fmt == 'gguf' else '.pt'}", fmt, [3], scale=0.5)
    imported = import_file(path, tmp_path / "back")
    torch.testing.assert_close(imported.vectors[0], 0.5 * run.vectors[3])
    assert imported.source_layer == 2


@pytest.mark.parametrize("fmt", ["gguf", "steering-vectors", "npy"])
def test_every_exported_format_opens_as_a_vector_source_with_its_layer(run, tmp_path, fmt):
    """`melbo generate --vector go8-3.gguf` (and `melbo ortho FILE`) read safetensors and the post's .pt only: a control
    vector melbo had just exported failed with "not a safetensors file (… header too large)". Every format `melbo
    import` reads now opens, with the layer the file records (a control vector's direction.N)."""
    from melbo.files.source import open_vectors

    (path,) = export_vectors(run, tmp_path / f"v{'.gguf' if fmt == 'gguf' else '.pt' if fmt == 'steering-vectors' else '.npy'}", fmt, [3])
    found = open_vectors(path)
    torch.testing.assert_close(found.vectors[0], run.vectors[3])
    assert found.source == (None if fmt == "npy" else 2)  # a bare array records no layer: --layer says it
    theta, layer = open_vectors(path, 2).at(0, 2)
    torch.testing.assert_close(theta, run.vectors[3])
    if fmt != "npy":
        with pytest.raises(MelboError, match="has layers \\[2\\], not 5"):
            open_vectors(path, 5)


def test_steering_vectors_library_steers_like_melbo(tiny_lm, tmp_path):
    """The real steering-vectors library loads the export and steers a tiny model exactly as melbo's hook."""
    sv = pytest.importorskip("steering_vectors", reason="steering-vectors is not installed (scripts/setup installs it)")
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    source = write_run(tmp_path / "r", vectors, {"layers": {"source": 2, "target": 4}, "vectors": [{"index": 0}]})
    (path,) = export_vectors(source, tmp_path / "sv.pt", "steering-vectors", [0])
    vector = sv.SteeringVector(**torch.load(path, weights_only=True))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    with torch.no_grad():
        with vector.apply(tiny_lm.model):
            theirs = tiny_lm.model(ids).logits
        with add_to_residual(tiny_lm.model, 2, vectors[0]):
            ours = tiny_lm.model(ids).logits
        plain = tiny_lm.model(ids).logits
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(ours, plain)
    assert residual_after(tiny_lm.model, 3, ids).shape == (1, 5, 32)


def test_import_errors(tmp_path):
    with pytest.raises(MelboError, match="does not exist"):
        import_file(tmp_path / "none.gguf", tmp_path / "o")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(MelboError, match="not a readable GGUF"):
        import_file(tmp_path / "bad.gguf", tmp_path / "o")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(MelboError, match="not a GGUF file .it does not start with the GGUF magic bytes"):
        import_file(tmp_path / "text.gguf", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_import_without_out_makes_a_run_folder_like_every_other_command(run, tmp_path):
    """`melbo import FILE` (and `import-post-dump`) take melbo-runs/KIND-DATE when --out is not given, as discover,
    ortho and study do; they used to stop at "Missing option '--out'"."""
    from helpers import melbo_here

    (path,) = export_vectors(run, tmp_path / "v.npy", "npy", [0, 1])
    result = melbo_here("import", str(path), "--layer", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "melbo-runs").iterdir()
    assert folder.name.startswith("import-") and str(folder.relative_to(tmp_path)) in result.stdout
    torch.testing.assert_close(read_run(folder).vectors, run.vectors[:2])
