"""Finding a model's parts by structure: the decoder blocks, the final norm (or whatever maps the last
block's output to the unembedding's input) and the unembedding, with no table of model types.

`find_parts` applies these rules in order; each is one function below, and a dotted path given by the
user (``layers=``, ``final_norm=``, ``unembed=``; ``--layers`` etc. on the CLI) replaces its search:

1. `find_layers`: the shallowest ``nn.ModuleList`` whose length a config field states (every decoder;
   LongCat-Flash's ``num_layers``). Refuses several stacks none of which has that length (HRM:
   blocks run in cycles) and blocks split over parallel lists (XLM).
2. `find_unembedding`: ``model.get_output_embeddings()``. Refuses one head per codebook (MusicGen).
3. `head_transform`: a BERT-style transform (dense, activation, norm) in the LM head before the
   unembedding (ELECTRA, Megatron-BERT), chained after a norm of the base model when the forward runs
   one first (`final_norm_before`: ModernBERT-decoder). Refuses a head that applies several parts in
   its own forward (RoBERTa).
4. `find_final_norm`: the norm outside the blocks that the forward runs after the last block (Llama,
   GPT-2, Gemma, OLMo 2, ...). Refuses a model with no norm after its blocks (GPT-1).
5. `stream_head`: where the stream is not one unembedding-wide vector per position, the first module
   after the last block that reads it and what runs after it (DeepSeek-V4 and HY-V4: the mixing head,
   then the norm; Qwen4-Exp's mixer; OPT's norm then ``project_out``).
6. `check_placement`: the final norm and the unembedding are on a device, not offloaded to disk.
7. `logit_transform`: what the model does to logits after the unembedding (Gemma 2/3 soft-cap, Cohere's
   scale, Granite's division, muP's width multiplier).

8. `find_block_parts` (on demand, for `lenses.model.adapter.ModelAdapter.residual_parts`): per block, the children
   whose outputs add up to what the block adds to the residual stream: attention (or a state-space mixer)
   and the MLP, or their post-norms (Gemma 2, OLMo 2). Refuses parts that add the residual themselves (BLOOM).

The result is proved numerically afterwards (`lenses.model.adapter.ModelAdapter.verify`): decoding the last
block's output must reproduce the model's logits. `docs/coverage.md` lists every causal-LM type of
transformers with the outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lenses.base.errors import LensesError, ModelStructureError, UnsupportedModelError


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The longest sequence the model's absolute positions allow (None: no fixed limit stated)."""
    if config is None:
        return None
    config = text_config(config)
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
    cfg = text_config(config)
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



@dataclass
class Parts:
    """What `find_parts` found: the blocks, the module whose input is ``hidden[L]`` (the final norm, a
    `HeadChain` or a `StreamHead`) and its path, the unembedding, the per-position stream shape where it
    is not one vector, and the logit transform."""

    layers: nn.ModuleList
    final_norm: nn.Module
    final_norm_path: str
    unembed: nn.Linear
    stream_shape: tuple[int, ...] | None
    softcap: float | None
    logit_scale: float


def find_parts(model: nn.Module, layers: str | None = None, final_norm: str | None = None,
               unembed: str | None = None, placed: bool = True) -> Parts:
    """Apply the rules of this module in order; dotted paths override the search for any part.
    ``placed=False`` skips the placement check (a model built on the meta device, for a memory plan)."""
    layers_path = layers or find_layers(model)
    layer_list = _get(model, layers_path)
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        raise ModelStructureError(f"{layers_path!r} is a {type(layer_list).__name__}, not a list of decoder "
                                  "layers; pass the dotted path of the nn.ModuleList of blocks (--layers).")
    head = find_unembedding(model, unembed)
    transform = None if final_norm or unembed else head_transform(model, head, layer_list)
    norm_path = final_norm or transform or find_final_norm(model, layers_path)
    norm = _get(model, norm_path)
    if transform:  # a final norm inside the base model may run first (ModernBERT-decoder): chain the two
        before = final_norm_before(model, layers_path, transform)
        if before:
            norm, norm_path = HeadChain(_get(model, before), norm), f"{before} -> {transform}"
    found = None if transform or not isinstance(head, nn.Linear) else stream_head(model, layers_path,
                                                                                   head.in_features)
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
    if placed:
        check_placement(norm, head)
    softcap, scale = logit_transform(model.config)
    return Parts(layer_list, norm, norm_path, head, stream_shape, softcap, scale)


def find_unembedding(model: nn.Module, unembed: str | None = None) -> nn.Module:
    """The unembedding: the module at ``unembed``, else ``model.get_output_embeddings()``."""
    head = _get(model, unembed) if unembed else model.get_output_embeddings()
    if isinstance(head, nn.ModuleList) and not unembed:
        raise UnsupportedModelError(
            f"the model has {len(head)} output heads (model.get_output_embeddings() is a list, as MusicGen's one "
            "head per audio codebook): a lens decodes through one unembedding. To read one of them, pass it: "
            "ModelAdapter.from_model(model, unembed='lm_heads.0') (--unembed)."
        )
    return head


def logit_transform(config) -> tuple[float | None, float]:
    """``(softcap, scale)`` the model applies to its logits: Gemma 2/3's final-logit soft-capping, Cohere's
    logit scale, Granite's division and muP's output width multiplier (Inkling)."""
    cfg = text_config(config)
    softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None) or None
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logits_mup_width_multiplier", None):  # muP output scaling (Inkling): h / m before the head
        scale /= float(cfg.logits_mup_width_multiplier)
    return softcap, scale


def check_placement(norm: nn.Module, head: nn.Module) -> None:
    """Every layer is decoded through the final norm and the unembedding: they cannot be offloaded to disk."""
    offloaded = [name for name, part in (("final norm", norm), ("unembedding", head))
                 if any(p.device.type == "meta" for p in part.parameters())]
    if offloaded:
        raise LensesError(
            f"the model's {' and '.join(offloaded)} {'is' if len(offloaded) == 1 else 'are'} offloaded to disk "
            "(device_map): every layer is decoded through them, so keep them on a device, e.g. a device_map "
            "that puts them on GPU 0 or CPU, or more max_memory."
        )


def find_layers(model: nn.Module) -> str:
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


def head_transform(model: nn.Module, head: nn.Module, layers: nn.ModuleList) -> str | None:
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
        others = norms_after_last_block(model, layers, others) if others else []
        return others[0] if len(others) == 1 else None
    if len(others) > 1:
        raise UnsupportedModelError(
            f"the unembedding {path!r} sits in a head that first applies {', '.join(others)} in its own forward "
            "(a post-norm LM head with no single module for it), so no module turns a hidden state into the "
            "unembedding's input. Wrap those parts in one module and pass it: "
            "ModelAdapter.from_model(model, final_norm=...)."
        )
    return f"{parent_path}.{others[0]}" if others else None


def final_norm_before(model: nn.Module, layers_path: str, transform: str) -> str | None:
    """A norm outside the blocks and outside the head transform that the forward runs after the last
    block (and so before the transform), if there is one."""
    names = [n for n, m in model.named_modules() if re.search("norm", type(m).__name__, re.I)
             and not n.startswith(layers_path + ".") and not n.startswith(transform + ".")
             and not any(isinstance(c, nn.ModuleList) for c in m.children())]
    ran = norms_after_last_block(model, _get(model, layers_path), names) if names else []
    return ran[0] if ran else None


def stream_head(model: nn.Module, layers_path: str, width: int):
    """Where the blocks' stream is not one ``width``-wide vector per position: ``(path, per-position shape,
    [paths])`` of the first module after the last block that reads the stream (a mixer of parallel streams,
    or a norm before a projection) and of the modules the model runs after it; None otherwise."""
    layers = _get(model, layers_path)
    parent, _, _ = layers_path.rpartition(".")
    names = [f"{parent}.{n}" if parent else n for n, c in _get(model, parent).named_children() if c is not layers]
    block, order = probe_after_last_block(model, layers, names)
    if block is None or block[2:] == (width,):
        return None
    mixer = next((name for name, shape in order if shape == block), None)
    if mixer is None:
        return None
    after = [name for name, shape in order if shape is not None]
    return mixer, block[2:], after[after.index(mixer) + 1:]


def find_final_norm(model: nn.Module, layers_path: str) -> str:
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
        ran = norms_after_last_block(model, _get(model, layers_path), candidates)
        if ran:
            return ran[0]
    return candidates[-1]  # registered after the layers: the final one


def norms_after_last_block(model: nn.Module, layers: nn.ModuleList, names: list[str]) -> list[str]:
    """Of the modules ``names``, those called after the last block in a 4-token pass, in call order."""
    return [name for name, _ in probe_after_last_block(model, layers, names)[1]]


def probe_after_last_block(model: nn.Module, layers: nn.ModuleList, names: list[str]):
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
    except Exception:  # a probe only: a forward that fails here fails the numeric proof, which names it
        return None, []
    finally:
        for h in hooks:
            h.remove()
    return seen["block"], list(seen["order"].items())
