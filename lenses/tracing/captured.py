"""Captured states checked against the model's head and served to `lenses.tracing.trace.trace` by token ids
(the rules are in `lenses.tracing.states`)."""

from __future__ import annotations

import torch

from lenses.base.errors import LensesError
from lenses.engine import decode, finish, unembed
from lenses.model.norm_affine import norm_affine
from lenses.tracing.states import Sequence, embeddings, read

# max |difference| over the logits' standard deviation: float32 states, 16-bit states
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def _misfit(z: torch.Tensor, logits: torch.Tensor) -> float:
    return float((z - logits).abs().max() / logits.std().clamp_min(1e-6))


class Captured:
    """Hidden states captured elsewhere for ``adapter``'s model, checked (`check`), by token ids."""

    def __init__(self, adapter, sequences: list[Sequence]):
        self.adapter, self.sequences = adapter, sequences
        self.by_ids = {s.ids: s for s in sequences}
        self.block_outputs, self.after_norm, self.notes, self._form = False, None, [], None
        self.check()

    @classmethod
    def of(cls, source, adapter) -> "Captured":
        """``source``: a path (file or folder) or nnsight's saved dictionary (or a list of them)."""
        return cls(adapter, read(source))

    # ---- the checks
    def check(self) -> None:
        """The layer count, layer 0 and the last layer's convention of every sequence (one line if wrong)."""
        if not any(s.logits for s in self.sequences):
            raise LensesError("--states needs the logits the model gave (stored as 'logits' beside the states) to "
                              "check the layer numbering; capture them too.")
        L, d, V = self.adapter.num_layers, self.adapter.d_model, self.adapter.vocab_size
        for k, seq in enumerate(self.sequences):
            raw = seq.states()
            if raw.dim() == 4 and raw.shape[1] == 1:
                raw = raw[:, 0]
            if raw.dim() != 3 or raw.shape[1] != len(seq.ids):
                raise LensesError(f"{seq.where}: states of shape {tuple(raw.shape)} for {len(seq.ids)} tokens; "
                                  "expected [layers, tokens, width].")
            if raw.shape[-1] != d:
                raise LensesError(f"{seq.where}: states {raw.shape[-1]} wide, but the model's residual stream is {d} "
                                  "wide: they were captured from another model; pass that model as --model.")
            if max(seq.ids, default=0) >= V or min(seq.ids, default=0) < 0:
                raise LensesError(f"{seq.where}: token ids outside the model's vocabulary of {V}: the states are of "
                                  "another model's tokens; pass that model as --model.")
            if raw.shape[0] not in (L, L + 1):
                raise LensesError(f"{seq.where}: {raw.shape[0]} states per token, but the model has {L} blocks: give "
                                  f"{L + 1} (the embeddings, then every block's output) or {L} (the blocks' outputs).")
            if k == 0:
                self.block_outputs = raw.shape[0] == L
            elif self.block_outputs != (raw.shape[0] == L):
                raise LensesError(f"{seq.where}: {raw.shape[0]} states per token, unlike the first sequence's; give "
                                  "every sequence the same layers.")
            self._check_first_layer(seq, raw)
            if seq.logits:
                self._check_last_layer(seq, raw[-1].to(self.adapter.device).float(), raw.dtype)
        self.notes.append(self._said())

    def _check_first_layer(self, seq: Sequence, raw: torch.Tensor) -> None:
        if self.block_outputs:
            return
        e = embeddings(self.adapter, torch.tensor(seq.ids))
        off = float((raw[0].to(e.device).float() - e).abs().max() / e.abs().max().clamp_min(1e-6))
        if off > TOLERANCE.get(raw.dtype, 1e-3) * 10:
            raise LensesError(f"{seq.where}: the first of the {raw.shape[0]} states is not the embeddings of the ids "
                              f"(off by {off:.2g} of their scale): the layers seem shifted. Put the embeddings first, "
                              "or give the blocks' outputs only (nnsight's layers[i].output, i = 0..L-1).")

    def _check_last_layer(self, seq: Sequence, last: torch.Tensor, dtype: torch.dtype) -> None:
        logits = seq.logits().to(self.adapter.device).float()
        logits = logits[None] if logits.dim() == 1 else logits.reshape(-1, logits.shape[-1])
        if logits.shape[-1] != self.adapter.vocab_size:
            raise LensesError(f"{seq.where}: logits over {logits.shape[-1]} tokens, but the model has "
                              f"{self.adapter.vocab_size}: they were captured from another model.")
        last = last[-len(logits):]  # the logits of the last positions, where fewer were kept
        tol = TOLERANCE.get(dtype, 1e-3)
        with torch.no_grad():
            residual = _misfit(decode(self.adapter, last, torch.float32), logits)
            normed = _misfit(finish(self.adapter, unembed(self.adapter, last, torch.float32).float()), logits)
        found = "residual" if residual <= tol else "normed" if normed <= tol else None
        if found is None:
            raise LensesError(f"{seq.where}: decoding the last state reproduces neither the stored logits (off by "
                              f"{residual:.2g} of their spread) nor, read as after the final norm, them (off by "
                              f"{normed:.2g}): the states are of another model or their layers are shifted.")
        if self.after_norm is None:
            self.after_norm = found == "normed"
        elif self.after_norm != (found == "normed"):
            raise LensesError(f"{seq.where}: its last state is {found}, unlike the first sequence's; capture every "
                              "sequence the same way.")

    def _said(self) -> str:
        L = self.adapter.num_layers
        first = (f"{L} block outputs, read as layers 1..{L} (layer 0, the embeddings, computed from the ids)"
                 if self.block_outputs else f"{L + 1} states, read as layers 0..{L} (layer 0 checked: the embeddings)")
        last = ("the last is after the final norm (transformers' output_hidden_states): mapped back through the "
                "norm's affine form" if self.after_norm else "the last is before the final norm (our convention)")
        n = sum(len(s.ids) for s in self.sequences)
        return (f"states: {len(self.sequences)} sequence(s), {n:,} tokens; {first}; {last}; decoding the last layer "
                "reproduces the stored logits")

    # ---- serving
    def layers(self, seq: Sequence) -> torch.Tensor:
        """``[L+1, T, d]`` float32 states of ``seq`` in our numbering, on the model's device."""
        raw = seq.states()
        raw = (raw[:, 0] if raw.dim() == 4 else raw).to(self.adapter.device).float()
        if self.block_outputs:
            raw = torch.cat([embeddings(self.adapter, torch.tensor(seq.ids))[None], raw])
        if self.after_norm:
            raw = raw.clone()
            raw[-1] = self._before_norm(raw[-1])
        return raw

    def _before_norm(self, y: torch.Tensor) -> torch.Tensor:
        """A state the final norm maps to ``y``. By `lenses.model.norm_affine`, ``u = (y - beta) / g`` is ``C x /
        sigma(x)``, so the norm maps ``c u`` to ``y`` for the ``c`` at which the norm's eps gives ``u`` its own
        scale (just below 1): found by bisection on the norm itself, per state (no eps is assumed)."""
        if self._form is None:  # measured once, not per text
            self._form = norm_affine(self.adapter.final_norm, self.adapter.d_model, y.device, torch.float32)
        form = self._form
        g, beta = form.weight.to(y), form.bias.to(y)
        if bool((g.abs() < 1e-12).any()):
            raise LensesError("the last state is after the final norm, whose gain is zero somewhere: it cannot be "
                              "mapped back; capture the last block's output instead.")
        u = (y - beta) / g
        want = form.scale(u)
        lo, hi = torch.full_like(want, -30.0), torch.full_like(want, 30.0)  # log c
        with torch.no_grad():
            for _ in range(64):
                mid = (lo + hi) / 2
                got = form.scale((self.adapter.final_norm(mid.exp()[:, None] * u) - beta) / g)
                lo, hi = torch.where(got < want, mid, lo), torch.where(got < want, hi, mid)
        return hi.exp()[:, None] * u

    def find(self, ids) -> Sequence:
        """The captured sequence that starts with ``ids`` (one line naming the fix when none does)."""
        ids = tuple(int(i) for i in ids)
        seq = self.by_ids.get(ids) or next((s for s in self.sequences if s.ids[: len(ids)] == ids), None)
        if seq is None:
            raise LensesError(f"--states holds no sequence starting with the {len(ids)} tokens this view reads "
                              f"({list(ids[:8])}...): capture the states of the texts the view reads (as the "
                              "model reads them: BOS, chat template), see docs/analysis.md.")
        return seq

    def hidden(self, ids, positions: list[int]) -> torch.Tensor:
        """``[L+1, P, d]``: the states of ``ids`` at ``positions``."""
        return self.layers(self.find(ids))[:, list(positions)]
