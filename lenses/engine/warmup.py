"""Compiling the tracing kernels ahead of use: in the background while a model loads."""

from __future__ import annotations

import os
import threading

import torch

from lenses.base import lifecycle
from lenses.engine.decoding import Teacher
from lenses.engine.kl import row_stats
from lenses.engine.rescored import TokenGroups, rescored_stats


class _StandIn:
    """What `rescored_stats` and `Teacher` read of a model, for `warm_up`: an unembedding of random rows (16
    wide) in the model's dtype, no final norm, no logit scale or soft-cap."""

    logit_scale, softcap = 1.0, None

    def __init__(self, vocab_size: int, device, dtype: torch.dtype):
        self.unembed = torch.nn.Linear(16, vocab_size, bias=False, device=device, dtype=dtype)

    def final_norm(self, h):
        return h

    def unembed_weight(self, dtype):
        return self.unembed.weight.detach().to(dtype)

    def unembed_plain(self):
        return self.unembed.weight.detach()


WARM_VOCAB = 33_000  # `warm_up`'s vocabulary: wide enough for `top_ids`'s blocks (any size compiles the same graphs)


def warm_up(dtype: torch.dtype, device="cpu", model_dtype: torch.dtype = torch.float32) -> None:
    """Compile the kernels a trace calls when it decodes in ``dtype`` on ``device`` a model whose weights are
    ``model_dtype`` (`row_stats`'s, and for a 16-bit ``dtype`` `rescored_stats`', `top_ids`'s and `_exact`'s), on
    three random rows through the same functions tracing calls, so that the same graphs are made: tracing then
    compiles nothing (tests/test_trace.py counts the graphs)."""
    with torch.no_grad():
        ad = _StandIn(WARM_VOCAB, device, model_dtype)
        x = torch.randn(3, 16, device=device)
        teacher = Teacher(ad, x, torch.float32, keep_logits=True)  # type: ignore[arg-type]
        t_ids = torch.zeros(3, 1, dtype=torch.long, device=device)
        row_stats(teacher.logits, teacher.p, teacher.neg_entropy, t_ids)
        if dtype in (torch.bfloat16, torch.float16):
            # 1 token in 50 outside group 0 (as the frequency view's ~1,000: inductor lays out sums of 4,097+ apart)
            groups = TokenGroups((torch.arange(WARM_VOCAB, device=device) % 50 == 0) * 7, 8)
            rescored_stats(ad, x, dtype, teacher.p, teacher.neg_entropy, t_ids, groups)  # type: ignore[arg-type]


def warm_up_in_background(dtype: torch.dtype, device="cpu", model_dtype: torch.dtype = torch.float32
                          ) -> threading.Thread | None:
    """`warm_up` in a background thread, started before the model loads (a first run compiles for ~20 s, mostly on one
    core, while loading leaves the other idle); a kernel called while it runs waits for it (rule 5 of
    `kernels`) rather than compiling twice. None where kernels are not compiled (``LENSES_COMPILE=0``)."""
    if os.environ.get("LENSES_COMPILE", "1") == "0":
        return None

    def run():
        try:
            warm_up(dtype, device, model_dtype)
        except Exception:  # only a head start: whatever failed here fails, with its message, where tracing calls it
            pass

    return lifecycle.start_background(run, "lenses-warm-up")  # joined before the process ends

