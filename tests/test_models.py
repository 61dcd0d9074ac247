"""Model loading: the embedded default (and its cache), and the documented errors."""

from __future__ import annotations

import pytest
import torch

from melbo import MelboError
from melbo.model.forward import generate_steered
from melbo.model.loading import cache_root, embedded_gguf_path, file_sha256, load_model
from melbo.model.prompts import PromptFormat, encode_prompt

pytestmark = pytest.mark.slow


def test_embedded_model_shape_and_source(smollm):
    assert smollm.n_layers == 30 and smollm.d_model == 576
    assert smollm.dtype == torch.float32
    assert smollm.source["sha256"] == file_sha256(embedded_gguf_path())
    assert type(smollm.model).__name__ == "LlamaForCausalLM"


def test_embedded_model_chats(smollm):
    ids = encode_prompt(smollm.tokenizer, "What is the capital of France?", PromptFormat(system="You are a helpful assistant."))
    text = smollm.tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    answer = generate_steered(smollm.model, smollm.tokenizer, ids, None, layer=8, max_new_tokens=12)[0]
    assert "Paris" in answer


def test_second_load_uses_cache(smollm, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr("melbo.model.loading._convert_gguf", no_conversion)
    lm = load_model("smollm2", device="cpu")
    folder = cache_root() / "gguf" / smollm.source["sha256"][:32]
    assert (folder / "model.safetensors").is_file()
    cached = lm.model.state_dict()
    original = smollm.model.state_dict()
    assert cached.keys() == original.keys()
    for name, param in original.items():  # every tensor, bit for bit
        assert torch.equal(cached[name], param), name


def test_gguf_path_and_errors(tmp_path):
    with pytest.raises(MelboError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    (tmp_path / "notes.gguf").write_text("just some text")
    with pytest.raises(MelboError, match="not a GGUF model file"):
        load_model(str(tmp_path / "notes.gguf"), device="cpu")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(embedded_gguf_path().read_bytes()[: 1 << 20])
    with pytest.raises(MelboError, match="cannot read GGUF file"):
        load_model(str(truncated), device="cpu")


def test_unknown_model_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MelboError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_missing_folder():
    with pytest.raises(MelboError, match="does not exist"):
        load_model("./no/such/folder", device="cpu")


def test_bad_device_and_dtype():
    with pytest.raises(MelboError, match="unknown dtype"):
        load_model("smollm2", device="cpu", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(MelboError, match="no CUDA GPU"):
            load_model("smollm2", device="cuda")


def test_generate_a_zero_vector_is_unsteered_and_a_big_one_steers(tiny_lm):
    """melbo.generate: the notebook form of `melbo generate`; the model is left as it was."""
    import melbo
    from melbo.analysis.config import GenerateConfig

    cfg = GenerateConfig(max_new_tokens=6)
    plain = melbo.generate(tiny_lm, None, 2, "Hi there", cfg=cfg)
    assert melbo.generate(tiny_lm, torch.zeros(tiny_lm.d_model), 2, "Hi there", cfg=cfg) == plain
    push = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(0))
    assert melbo.generate(tiny_lm, 50 * push / push.norm(), 2, "Hi there", cfg=cfg) != plain
    assert melbo.generate(tiny_lm, None, 2, "Hi there", cfg=cfg) == plain  # the hook is gone
    with pytest.raises(melbo.MelboError, match="out of range"):
        melbo.generate(tiny_lm, None, 9, "Hi there", cfg=cfg)


def test_a_hub_id_that_cannot_load_is_one_line_at_once_when_online(tmp_path):
    """HF_HUB_OFFLINE unset: a mistyped id where the Hub cannot be reached cost ~50 s of transformers' retries and a
    dozen warning lines before melbo's error; one request now says why in one line. A Hub (a loopback stand-in) that
    has no such model says that instead."""
    import http.server
    import os
    import socket
    import subprocess
    import sys
    import threading

    from helpers import assert_one_line_error

    def info(endpoint: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
        return subprocess.run([sys.executable, "-m", "melbo.cli", "info", "--model", "no-such-org/no-such-model"],
                              capture_output=True, text=True, env=env, timeout=300)

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert_one_line_error(info(f"http://127.0.0.1:{closed}"), f"the Hugging Face Hub (http://127.0.0.1:{closed}) cannot be reached")

    class NoSuchRepo(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # what the Hub answers for a repository it does not have
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert_one_line_error(info(f"http://127.0.0.1:{server.server_address[1]}"), "the Hugging Face Hub has no model of that name")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
