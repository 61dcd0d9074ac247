"""The bad-input table: each mistake gives one line saying what is wrong, exit status 2, no traceback,
and no file left half-written. (A disk that fills while saving is simulated in test_runs.py: the previous
files stay intact.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model
from helpers import assert_one_line_error, melbo, melbo_here
from safetensors.torch import save_file

from melbo.files.runs import write_run
from melbo.model.loading import embedded_gguf_path, load_model


def good_run(tmp: Path, d: int = 576) -> Path:
    meta = {"model": {"name": "smollm2"}, "layers": {"source": 8, "target": 20}, "vectors": [{"index": 0}, {"index": 1}]}
    write_run(tmp / "run", torch.randn(2, d), meta)
    return tmp / "run"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def prepare(case: str, tmp: Path) -> list[str]:
    """Files a case needs, and the command line."""
    if case == "truncated gguf":
        (tmp / "cut.gguf").write_bytes(embedded_gguf_path().read_bytes()[: 1 << 20])
        return ["info", "--model", str(tmp / "cut.gguf")]
    if case == "vectors of another d_model":
        return ["generate", "--run", str(good_run(tmp, d=100))]
    if case == "vector file with NaN":
        bad = torch.randn(2, 576)
        bad[1, 3] = float("nan")
        save_file({"vectors": bad}, str(tmp / "nan.safetensors"))
        return ["ortho", str(tmp / "nan.safetensors"), "-s", "8", "-t", "20", "--out", str(tmp / "o")]
    if case == "vector file not safetensors":
        (tmp / "v.safetensors").write_text("hello")
        return ["ortho", str(tmp / "v.safetensors"), "-s", "8", "-t", "20", "--out", str(tmp / "o")]
    if case == ".pt with pickled code":
        with open(tmp / "evil.pt", "wb") as handle:
            pickle.dump(Evil(), handle)
        return ["ortho", str(tmp / "evil.pt"), "-s", "8", "-t", "20", "--out", str(tmp / "o")]
    if case == "run.json corrupt":
        run = good_run(tmp)
        (run / "run.json").write_text("{oops")
        return ["ortho", str(run), "--out", str(tmp / "o")]
    if case == "run.json missing":
        (tmp / "empty-run").mkdir()
        return ["ortho", str(tmp / "empty-run"), "--out", str(tmp / "o")]
    if case == "output folder not writable":
        if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
            return ["discover", "-k", "1", "--out", "/sys/melbo-run"]
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return ["discover", "-k", "1", "--out", str(locked / "run")]
    if case == "output folder holds another run":
        return ["discover", "-k", "1", "--out", str(good_run(tmp))]
    if case == "output folder holds a study":
        (tmp / "done").mkdir()
        (tmp / "done" / "study.json").write_text('{"units": [{"name": "", "label": "", "model": "smollm2", "steps": {"discover": 60.0}}]}')
        return ["study", str(Path(__file__).parents[1] / "examples" / "demo.toml"), "--out", str(tmp / "done")]
    if case == "bare vector file, no layers":
        save_file({"vectors": torch.randn(1, 576)}, str(tmp / "v.safetensors"))
        return ["ortho", str(tmp / "v.safetensors"), "--out", str(tmp / "o")]
    if case == "bare vector file, no --layer":
        save_file({"vectors": torch.randn(1, 576)}, str(tmp / "v.safetensors"))
        return ["generate", "--vector", str(tmp / "v.safetensors")]
    if case == "both --run and --vector":
        save_file({"vectors": torch.randn(1, 576)}, str(tmp / "v.safetensors"))
        return ["generate", "--vector", str(tmp / "v.safetensors"), "--run", str(good_run(tmp))]
    if case == "unknown export format":
        return ["export", str(good_run(tmp)), "--format", "onnx"]
    if case == "export index out of range":
        return ["export", str(good_run(tmp)), "--index", "9"]
    if case == "export index range backwards":
        return ["export", str(good_run(tmp)), "--index", "1-0"]
    if case == "export to a folder that cannot be made":
        return ["export", str(good_run(tmp)), "-o", "/proc/no-such-folder/v.gguf"]  # procfs: no new folders, even for root
    if case == "compose with k 0":
        return ["compose", str(good_run(tmp)), "--k", "0,2"]
    if case == "compose on a discovery":
        write_run(tmp / "disc", torch.randn(3, 576), {"kind": "discover", "model": {"name": "smollm2"}, "layers": {"source": 8, "target": 20},
                                                      "vectors": [{"index": i} for i in range(3)]})
        return ["compose", str(tmp / "disc")]
    if case == "generate with a nan scale":
        return ["generate", "--run", str(good_run(tmp)), "--scale", "nan"]
    if case == "prompt file empty":
        (tmp / "prompts.txt").write_text("\n  \n")
        return ["discover", "--prompt-file", str(tmp / "prompts.txt"), "--out", str(tmp / "o")]
    raise AssertionError(case)


CASES = [
    # (name, command line or None for prepare(), text the one line must hold)
    ("layer out of range", ["discover", "-t", "30"], "between 0 and 29"),
    ("source not before target", ["discover", "-s", "20", "-t", "8"], "must come before"),
    ("R zero", ["discover", "-R", "0"], "positive number"),
    ("R not a number", ["discover", "-R", "abc"], "R must be a positive number or auto, got abc"),
    ("auto R with bad radii", ["discover", "--radii", "10,-5"], "every candidate R must be a positive number"),
    ("auto R with radii not numbers", ["discover", "--calibrate", "--radii", "ten"], "give numbers separated by commas"),
    ("radii with a fixed R", ["discover", "-R", "20", "--radii", "10,20"], "nothing to choose"),
    ("probes' precision unknown", ["discover", "--probe-precision", "fp8"], "--probe-precision 'fp8': use auto, float32 or bfloat16"),
    ("K zero", ["discover", "-k", "0"], "at least 1"),
    ("empty prompt", ["discover", "--prompt", ""], "empty"),
    ("prompt file missing", ["discover", "--prompt-file", "no-such-file.txt"], "does not exist"),
    ("prompt file empty", None, "holds no prompt"),
    ("unknown positions", ["discover", "--positions", "middle"], "skip-first, all, or last:N"),
    ("unknown model offline", ["info", "--model", "no-such-org/no-such-model"], "cannot load model"),
    ("model folder missing", ["info", "--model", "./no/such/model"], "does not exist"),
    ("truncated gguf", None, "cannot read GGUF file"),
    ("vectors of another d_model", None, "d_model 100 but the model has 576"),
    ("vector file with NaN", None, "contain NaN or inf"),
    ("vector file not safetensors", None, "not a safetensors file"),
    (".pt with pickled code", None, "refused"),
    ("run.json corrupt", None, "corrupt"),
    ("run.json missing", None, "no run.json"),
    ("run folder missing", ["ortho", "no-such-run"], "does not exist"),
    ("output folder not writable", None, "cannot write the run folder"),
    ("output folder holds another run", None, "already holds a run"),
    ("output folder holds a study", None, "already holds a study"),
    ("bare vector file, no layers", None, "--source and --target are needed"),
    ("bare vector file, no --layer", None, "--layer is needed"),
    ("both --run and --vector", None, "give exactly one of"),
    ("unknown option", ["discover", "--no-such-option"], "No such option"),
    ("unknown export format", None, "unknown format"),
    ("export index out of range", None, "vectors 0 to 1"),
    ("export index range backwards", None, "a range goes from low to high, e.g. 0-1"),
    ("prompt file is a folder", ["discover", "--prompt-file", ".", "--out", "o"], "prompt file . is a folder, not a file"),
    ("export to a folder that cannot be made", None, "/proc/no-such-folder/v.gguf: cannot write here"),
    ("compose with k 0", None, "at least 1"),
    ("compose on a discovery", None, "compose needs a MELBO-ortho run (row 0 = θ0)"),
    ("generate with a nan scale", None, "'--scale': nan is not a finite number"),
]


IN_A_PROCESS = {"unknown option", "truncated gguf", ".pt with pickled code", "output folder holds another run", "export to a folder that cannot be made"}


@pytest.mark.parametrize("name, args, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, needle, tmp_path, monkeypatch):
    """Every case through melbo's entry point; a few (parsing, loading, unpickling, the folder) also as a real process."""
    monkeypatch.chdir(tmp_path)
    command = prepare(name, tmp_path) if args is None else args
    prepared = set(tmp_path.rglob("*"))
    result = (melbo if name in IN_A_PROCESS else melbo_here)(*command, cwd=tmp_path)
    assert_one_line_error(result, needle)
    assert set(tmp_path.rglob("*")) == prepared, "a failed command left files behind"
    assert not (tmp_path / "PWNED").exists()


def test_table_has_at_least_fifteen_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("args, needle", [
    (["discover", "-R", "0"], "positive number"),
    (["discover", "-s", "20", "-t", "8"], "must come before"),
    (["discover", "--positions", "middle"], "skip-first, all, or last:N"),
    (["ortho", "BASE", "-s", "8", "-t", "20", "--optimizer", "sgd"], "use lbfgs or adam"),
    (["ortho", "BASE", "-s", "8", "-t", "20", "--mode", "seed", "--optimizer", "lbfgs"], "its optimiser is Adam"),
], ids=["R zero", "source after target", "positions", "optimizer", "seed with lbfgs"])
def test_settings_are_checked_before_the_model_loads(args, needle, tmp_path):
    """A mistyped setting costs a second, not a model load: the missing model is never reached."""
    save_file({"vectors": torch.randn(1, 576)}, str(tmp_path / "base.safetensors"))
    args = [str(tmp_path / "base.safetensors") if a == "BASE" else a for a in args]
    result = melbo_here(*args, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "o").exists()


def test_a_model_that_overflows_float16_is_one_line_at_load(tiny_folder, tmp_path):
    """--dtype float16 on a model whose activations exceed float16's range (Gemma 3 270M's do, on any text): one line
    naming the dtypes that work, before any work and with no run folder; a model that fits float16 loads in it."""
    model, huge = make_tiny_model("llama", initializer_range=0.3), tmp_path / "huge"
    model.model.layers[0].mlp.down_proj.weight.mul_(1e4)  # its weights within float16's range (|w| ≤ 1.1e4), its output beyond it
    model.save_pretrained(huge)
    make_char_tokenizer().save_pretrained(huge)
    result = melbo_here("discover", "-k", "1", "--model", str(huge), "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert_one_line_error(result, "overflows float16: its activations exceed float16's range (±65,504)")
    assert "load it in bfloat16 or float32 (--dtype)" in result.stderr and not (tmp_path / "o").exists()
    assert load_model(str(tiny_folder), device="cpu", dtype="float16").dtype == torch.float16


def test_nonsense_layers_on_a_small_model_and_auto_R_with_bad_radii(tiny_folder, tmp_path):
    """On a 6-layer model, layers meant for SmolLM2 are one line each, before any work; so is a bad candidate R."""
    model = ["--model", str(tiny_folder), "--device", "cpu"]
    cases = [
        (["discover", "-s", "8", "-t", "20", *model], "layers must be between 0 and 5 (this model has 6)"),
        (["discover", "-s", "4", *model], "the source layer (4) must come before the target layer (4)"),
        (["discover", "-R", "auto", "--radii", "5,0", *model], "every candidate R must be a positive number"),
        (["discover", "--calibrate", "--radii", "5,x", *model], "give numbers separated by commas"),
    ]
    for args, needle in cases:
        assert_one_line_error(melbo_here(*args, "--out", str(tmp_path / "o"), cwd=tmp_path), needle)
    assert not (tmp_path / "o").exists()
