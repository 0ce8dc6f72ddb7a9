"""A model without its blocks: the embeddings, the final norm and the unembedding, for reading hidden states
that another engine captured (``lenses analyze --states``).

1. The model is built from its config with its weights on the meta device (no memory; its small buffers are
   computed as usual), so its structure is the real one: the parts are found by the same rules
   (`lenses.model.discovery`), and lenses see the real number of layers.
2. Only the tensors outside the decoder layers are read from the model's safetensors files (one tensor at a
   time); the blocks stay on the meta device and are never read into memory.
3. The fingerprint (`lenses.model.fingerprint`) still covers every weight: each tensor of the files is
   summarised as it streams past, so a lens made for another model is refused as with the whole model.
4. There is no forward pass to prove the decoding on (`lenses.model.proof`): the states file's own logits are
   the proof (`lenses.tracing.captured.Captured.check`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lenses.base.errors import LensesError
from lenses.model import fingerprint
from lenses.model.adapter import ModelAdapter
from lenses.model.discovery import find_layers
from lenses.model.loading import resolve_model_path


def _files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file, or a sharded checkpoint's index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise LensesError(f"--states reads the model's head from its safetensors files, and {folder} has none; "
                          "pass a model folder with model.safetensors (or a .gguf file).")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _read(where: dict[str, Path], name: str, dtype: torch.dtype) -> torch.Tensor:
    from safetensors import safe_open

    if name not in where:
        raise LensesError(f"the model's files hold no tensor {name!r}, which its config asks for; --states needs a "
                          "checkpoint saved by transformers for this architecture.")
    with safe_open(where[name], "pt") as f:
        return f.get_tensor(name).to(dtype)


def _streamed_fingerprint(model: torch.nn.Module, where: dict[str, Path]) -> dict:
    """`fingerprint.of_model` of the whole model, each tensor read from the files one at a time."""
    transposed = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
    named = list(model.named_parameters(remove_duplicate=False))
    source: dict[int, str] = {}
    for name, p in named:  # tied weights: any of their names, the one the files hold where there is one
        if id(p) not in source or (name in where and source[id(p)] not in where):
            source[id(p)] = name
    done: dict[int, list[float]] = {}
    for name, p in named:
        if id(p) not in done:
            w = _read(where, source[id(p)], torch.float32)
            done[id(p)] = fingerprint.tensor_summary(w.T if id(p) in transposed else w)
    return {"version": fingerprint.VERSION, "tensors": {name: done[id(p)] for name, p in named}}


def load_head(options, device: str | torch.device | None = None):
    """``(model, tokenizer, adapter)`` of `lenses.model.loading.ModelOptions` ``options`` with only the head in
    memory (see the module docstring); ``adapter.fingerprint()`` covers every weight."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if options.device_map or options.quantize:
        raise LensesError("--states reads the model's head only (embeddings, final norm, unembedding): drop "
                          "--device-map and --quantize.")
    dtype = getattr(torch, options.model_dtype)
    folder = Path(resolve_model_path(options.model, dtype))
    if not folder.is_dir():
        raise LensesError(f"--states needs the model's files: {folder} is not a local model folder; pass a folder "
                          "or a .gguf file as --model.")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # weights on meta; buffers (rotary, embedding scale) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    where = _files(folder)
    blocks = find_layers(model) + "."
    device = torch.device(device or options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names: dict[int, list[str]] = {}  # tied weights share one parameter; the files may hold any of its names
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    head = {}
    for group in names.values():
        stored = [n for n in group if n in where]
        if stored and not all(n.startswith(blocks) for n in group):
            t = _read(where, stored[0], dtype).to(device)
            head.update({n: t for n in group})
    model.load_state_dict(head, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(blocks)]
    if missing:
        raise LensesError(f"the model's files hold no tensor {missing[0]!r} of its head; --states needs a checkpoint "
                          "saved by transformers for this architecture.")
    model.eval().requires_grad_(False)
    adapter = ModelAdapter.from_model(model, layers=options.layers, final_norm=options.final_norm,
                                      unembed=options.unembed, verify=False)
    adapter._fixed_fingerprint = {**_shapes(adapter), "weights": _streamed_fingerprint(model, where)}
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tok, adapter


def _shapes(adapter: ModelAdapter) -> dict:
    """The fingerprint's fields besides ``weights`` (no block probes: the blocks are not in memory)."""
    return {"model_type": getattr(adapter.model.config, "model_type", "unknown"), "num_layers": adapter.num_layers,
            "d_model": adapter.d_model, "vocab_size": adapter.vocab_size, "unembed_probe": None, "block_probe": [],
            "quantized": None}
