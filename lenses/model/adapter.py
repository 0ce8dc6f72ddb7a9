"""The runtime view of a model: `ModelAdapter` names a causal LM's decoder layers, final norm and
unembedding (found by `lenses.model.discovery`), reads and edits the residual stream between blocks, checks
numerically that decoding the last layer reproduces the model's logits, and fingerprints the model.
Loading models is `lenses.model.loading`.

Layer convention: ``hidden[l]`` is the residual stream after ``l`` blocks, i.e. the *input* of block
``l``; ``hidden[0]`` is the embedding output and ``hidden[L]`` the output of the last block *before*
the final norm. Decoding ``hidden[L]`` with the logit lens reproduces the model's logits exactly.
Hooking block *outputs* is off by one against this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lenses.base import door
from lenses.base.errors import LensesError, ModelStructureError, UnsupportedModelError
from lenses.model import fingerprint, proof
from lenses.model.block_parts import BlockParts, find_block_parts, first_outputs, parts_tolerance
from lenses.model.discovery import (
    HeadChain,
    StreamHead,
    find_parts,
    max_positions,
    stream_arg,
    with_stream,
)
from lenses.model.fingerprint import plain


def is_quantized(w: torch.Tensor) -> bool:
    return plain(w) is not w


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


def repeat_cache(forward: dict, times: int) -> dict:
    """`ModelAdapter.prefix_cache`'s keyword arguments with the cache repeated ``times`` along the batch (in
    place)."""
    if times > 1:
        forward["cache" if "cache" in forward else "past_key_values"].batch_repeat_interleave(times)
    return forward


@dataclass
class ModelAdapter:
    """A causal LM with its parts named: decoder ``layers``, ``final_norm``, ``unembed``.

    Also records what the model does to logits after the unembedding (Gemma 2/3 final-logit
    soft-capping, Cohere/Granite logit scaling), so that `lenses.engine.decode` of ``hidden[L]``
    equals the model's logits. The adapter only names parts; decoding lives in `lenses.engine`.
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
        """Find the parts by structure (`lenses.model.discovery.find_parts`: its rules, in order); dotted paths
        override the search for any of them. ``verify`` then proves them numerically."""
        door.module("model", model)
        for name, value in (("layers", layers), ("final_norm", final_norm), ("unembed", unembed)):
            door.text(name, value, optional=True)
        door.boolean("verify", verify)
        parts = find_parts(model, layers, final_norm, unembed)
        adapter = cls(model, parts.layers, parts.final_norm, parts.unembed, parts.softcap, parts.logit_scale,
                      parts.final_norm_path, parts.stream_shape)
        if verify:
            adapter.verify()
        return adapter

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
        """The unembedding ``[V, d]`` in ``dtype``; a cached copy per dtype (at most two; the model is frozen).
        A quantized unembedding (``--quantize``) is dequantized into the copy."""
        w = self.unembed.weight
        if w.dtype == dtype and not is_quantized(w):
            return w
        key = (dtype, w.device, id(w) if is_quantized(w) else w.data_ptr())  # a moved model: a new copy
        if key not in self._weight_cache:
            while len(self._weight_cache) >= 2:
                self._weight_cache.pop(next(iter(self._weight_cache)))
            self._weight_cache[key] = plain(w.detach()).to(dtype)
        return self._weight_cache[key]

    def unembed_plain(self) -> torch.Tensor:
        """The unembedding ``[V, d]`` as a plain tensor in its own dtype (no copy), or dequantized to float32
        (the cached copy of `unembed_weight`) where it is quantized."""
        w = self.unembed.weight
        return self.unembed_weight(torch.float32) if is_quantized(w) else w.detach()

    def unembed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the unembedding in float32 (no full copy unless the weight is quantized)."""
        return self.unembed_plain()[ids].float()

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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
        """Residual stream ``[L+1, batch, seq, d]`` in the layer convention of this module.

        Runs the headless base model (no [tokens x vocab] logits are made) with pre-hooks on
        every block and on the final norm. A model whose blocks run more than once per pass (looped,
        recurrent-depth) is refused: a layer number would not name one state. ``kwargs`` go to the model
        (e.g. `prefix_cache`'s, to continue after a prefix: the states of ``input_ids`` only).
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
            self.run_stream(input_ids, attention_mask, **kwargs)
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

    @property
    def block_parts(self) -> BlockParts:
        """The two parts of every block (`block_parts.find_block_parts`), found on first use and proved on a
        4-token pass; raises `UnsupportedModelError` with the reason for a block with no such decomposition."""
        if getattr(self, "_block_parts", None) is None:
            ids = torch.arange(1, 5, device=self._input_device())[None] % self.vocab_size
            self._block_parts = find_block_parts(self.layers, lambda: self.hidden_states(ids))
        return self._block_parts

    def residual_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       with_hidden: bool = False) -> dict[str, torch.Tensor]:
        """What each block adds to the residual stream, by part: ``{"attn": [L, batch, seq, d], "mlp": [L, ...]}``
        with ``hidden[l] + attn[l] + mlp[l] == hidden[l+1]`` (checked on this input: `LensesError` if it fails).
        ``attn`` is the block's mixer (attention, or a state-space mixer: ``block_parts.mixer[l]`` says which);
        ``mlp`` includes every expert of a mixture (zero in a mixer-only block). ``hidden[l] + attn[l]`` is the
        mid-block state (a half layer). ``with_hidden`` adds ``"hidden"`` [L+1, ...]."""
        parts = self.block_parts
        named = [[(key, getattr(block, name)) for key, name in (("attn", parts.first[i]), ("mlp", parts.second[i]))
                  if name is not None] for i, block in enumerate(self.layers)]
        got, hidden = first_outputs(named, lambda: self.hidden_states(input_ids, attention_mask))
        zero = torch.zeros_like(hidden[0])
        out = {key: torch.stack([g[key].to(self.device).reshape(hidden.shape[1:]) if key in g else zero for g in got])
               for key in ("attn", "mlp")}
        for layer in range(self.num_layers):
            err = float((hidden[layer] + out["attn"][layer] + out["mlp"][layer] - hidden[layer + 1]).abs().amax())
            if not err <= parts_tolerance(hidden[layer], hidden[layer + 1]):
                raise LensesError(f"the parts of block {layer} ({parts.first[layer]}, {parts.second[layer]}) do not "
                                  f"add up to its output on this input (off by {err:.1e}): the model branches on its "
                                  "input; per-part readings are not defined for it.")
        if with_hidden:
            out["hidden"] = hidden
        return out

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

    def prefix_cache(self, prefix_ids: torch.Tensor, repeat: int = 1) -> dict | None:
        """Run ``prefix_ids`` once; return the keyword arguments of `run_stream` that continue from its KV
        cache (``{"cache" or "past_key_values": cache, "use_cache": True}``), the cache repeated ``repeat``
        times along the batch. None where the model returns no cache that can be reused that way: run the
        whole sequence instead (the same numbers, slower). The J-lens fit and patching share this."""
        try:
            out = self.run_stream(prefix_ids, use_cache=True)
            if not isinstance(out, Mapping):
                return None
            key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.24 names it `cache`
            if out.get(key) is None:
                return None
            return repeat_cache({key: out[key], "use_cache": True}, repeat)
        except (AttributeError, TypeError, ValueError, NotImplementedError, KeyError):
            return None

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
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                raise LensesError(f"token id {bad} is outside the model's embedding (ids 0..{rows - 1}): "
                                  "the ids were made by another tokenizer. Tokenize with this model's tokenizer.")
        limit = max_positions(getattr(self.model, "config", None))
        if limit and input_ids.shape[1] > limit:
            raise LensesError(f"a sequence of {input_ids.shape[1]} tokens is longer than the model's {limit} "
                              "positions; cut the text to at most that many tokens (train_probes.py: --seq-len).")

    def _input_device(self) -> torch.device:
        """Where the token ids go: the embedding's device (differs from ``device`` under a device map)."""
        emb = self.model.get_input_embeddings()
        dev = emb.weight.device if emb is not None else self.device
        return self.device if dev.type == "meta" else dev

    def verify(self) -> None:
        """The numeric proof that the parts found are the model's (`lenses.model.proof.verify`)."""
        proof.verify(self)

    # ---- identity (`lenses.model.fingerprint`)
    def fingerprint(self) -> dict[str, Any]:
        """Shapes, ``weights`` (every parameter contributes) and the older probes lenses saved before
        (`lenses.model.fingerprint.of_adapter`); computed once per state of the weights (an in-place change
        recomputes it). A model whose blocks are sharded (`lenses.jobs.sharding`) answers with the fingerprint
        taken before; a model read without its blocks (`lenses.model.head`), with the one its files gave."""
        if getattr(self, "_sharded_fingerprint", None) is not None:
            return self._sharded_fingerprint
        if getattr(self, "_fixed_fingerprint", None) is not None:
            return self._fixed_fingerprint
        key = tuple((id(p), p._version) for p in self.model.parameters())
        if getattr(self, "_fingerprint_key", None) != key:
            self._fingerprint, self._fingerprint_key = fingerprint.of_adapter(self), key
        return self._fingerprint

    def check_fingerprint(self, saved: dict[str, Any], what: str = "lens", strict: bool = True) -> str | None:
        """Refuse a lens made for another model, naming what differs; return a one-line note where it is
        read anyway (a quantized copy of its model, or ``strict=False``), else None (`fingerprint.check`)."""
        return fingerprint.check(saved, self.fingerprint(), what, strict)
