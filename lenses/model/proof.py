"""The numeric proof of a model's parts (run by `ModelAdapter.from_model`): on a 4-token input, decoding the
last hidden state with the final norm and unembedding found reproduces the model's logits, the model is
causal, and the final norm reads the last block's output. (``self``: the adapter under proof.)"""

from __future__ import annotations

import torch

from lenses.base.errors import LensesError, ModelStructureError, UnsupportedModelError
from lenses.engine import decode
from lenses.model.discovery import text_config


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float rounding at the tensors' own scale (GPU kernels differ with batch shape)."""
    a, b = a.float(), b.float()
    return bool(((a - b).abs().max() <= rel * (1.0 + b.abs().max())).item()) if a.numel() else True






def verify(self) -> None:
    """Check on a 4-token input that decoding the last hidden state reproduces the model's logits, that
    the model is causal, and that the final norm reads the last block's output."""
    vocab = min(self.vocab_size, int(getattr(text_config(self.model.config), "vocab_size", self.vocab_size)))
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
        _check_last_block(self, last_out, both[-1])
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
