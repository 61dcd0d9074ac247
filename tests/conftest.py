"""Shared fixtures: tiny random-weight models of several architectures, a character tokenizer with a chat
template, and the embedded SmolLM2 (loaded once per session, for the few end-to-end tests)."""

from __future__ import annotations

import os
import shutil
import string
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (scripts/test runs two workers) each worker computes on one thread, and so does every interpreter
# a test starts (the CLI, the benchmarks, servers): two workers share the cores instead of four threads fighting over
# two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name → (config class name, kwargs): five-plus architectures, shrunk to a few thousand parameters.
TINY = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256)),
}
ARCHS = list(TINY)


def make_tiny_model(arch: str, n_layers: int = 6, seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers

    config_name, kwargs = TINY[arch]
    config_cls = getattr(transformers, config_name)
    layer_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    config = config_cls(vocab_size=VOCAB, **{layer_key: n_layers}, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


def save_tiny_folder(folder, arch: str = "llama", **overrides):
    """A tiny model and the character tokenizer saved as a model folder, so the CLI and `load_model` can read it."""
    make_tiny_model(arch, **{"n_layers": 6, "initializer_range": 0.3, **overrides}).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama (larger random weights, 6 layers) saved as a model folder."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def two_models(tmp_path_factory):
    """Two tiny models of different families saved as folders: [llama, qwen2]."""
    return [str(save_tiny_folder(tmp_path_factory.mktemp(arch), arch)) for arch in ("llama", "qwen2")]


def make_char_tokenizer():
    """A character-level fast tokenizer with ChatML specials and a chat template; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir():
    """Ray's session folders (logs, sockets, spilled objects) go under a folder of this test run's, removed after it,
    rather than into /tmp/ray, where the suite left one per local cluster; short, as Ray's socket paths must fit 107
    characters. A RAY_TMPDIR you set is kept."""
    if "RAY_TMPDIR" in os.environ:
        yield
        return
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["RAY_TMPDIR"] = temp
    try:
        yield
    finally:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def converted_embedded_model():
    """Convert the embedded GGUF once before any test, as a first `melbo` run would: later CLI calls then
    print only what the tests look at (a fresh machine's first call also says it is converting)."""
    from melbo.model.loading import _cached_gguf, embedded_gguf_path

    _cached_gguf(embedded_gguf_path())


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny(request):
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_lm(char_tokenizer):
    """A LoadedModel around a tiny Llama, for engine and CLI-level API tests."""
    from melbo.model.loading import LoadedModel

    return LoadedModel(model=make_tiny_model("llama"), tokenizer=char_tokenizer, name="tiny-llama", source={"id": "tiny"})


@pytest.fixture
def nonlinear_lm(char_tokenizer):
    """A tiny Llama with larger random weights: default weights (std 0.02) make a near-identity network
    in which every direction acts alike, unlike real models."""
    from melbo.model.loading import LoadedModel

    return LoadedModel(make_tiny_model("llama", initializer_range=0.3), char_tokenizer, "tiny-nonlinear", {"id": "tiny"})


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (converted once into the user's cache, then ~2 s a load)."""
    from melbo.model.loading import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M (bench/models.py), for the optional tests/test_gemma.py."""
    from helpers import load_fetched_model

    return load_fetched_model("gemma")


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct (bench/models.py), for the optional tests/test_qwen.py."""
    from helpers import load_fetched_model

    return load_fetched_model("qwen")
