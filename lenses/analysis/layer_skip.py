"""Layer-skip view (after Csordás et al. 2025, "Do Language Models Use Their Depth Efficiently?"):
skip block l (its residual update set to zero, or to its mean update over the text) and measure,
at every later layer m, how much the lens readout moves (KL from the unskipped readout), and how
the model's output changes (KL, accuracy against the true next token, top-1 agreement).

Only the readouts of layers m > l can change; cells m <= l are left empty. The unskipped readouts
are recomputed from stored hidden states rather than kept, so memory is one ``[positions x vocab]``
pair per step, never ``[layers x positions x vocab]``.
"""

from __future__ import annotations

import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, require, table_plot, text_blocks
from lenses.model.intervene import skip_block
from lenses.tracing import parallel
from lenses.tracing.intervals import describe, mean_interval


def _log_probs(lens, h: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.log_softmax(lens(h, layer).float(), -1)


def layer_skip_view(adapter, tokenizer, lenses: dict, texts: list[str], num_positions: int = 128,
                    seq_len: int = 64, mode: str = "zero", seed: int = 0, progress: bool = False, batch_size: int = 1,
                    source: str = "the texts given") -> ViewResult:
    from tqdm.auto import tqdm

    require(mode in ("zero", "mean"), f"unknown skip mode {mode!r}: use zero or mean.")
    chosen, held, available, first = text_blocks(texts, tokenizer, seq_len, num_positions, seed, "layer-skip")
    ids = held[sorted(chosen)]
    targets = ids[:, first + 1:].reshape(-1)[:num_positions].to(adapter.device)
    texts_of = (torch.arange(len(targets)) // (seq_len - 1 - first)).numpy()  # which text each position is in
    L = adapter.num_layers

    def stream(hidden):  # [L+1, B, seq, d] -> [L+1, N, d] at the scored positions
        return hidden[:, :, first:-1].reshape(L + 1, -1, hidden.shape[-1])[:, :num_positions]

    base = stream(adapter.hidden_states(ids))
    means = (base[1:] - base[:-1]).mean(1) if mode == "mean" else None  # [L, d] mean update of each block
    output_lens = next(iter(lenses.values()))  # every lens reads layer L as the model's own output
    effects, outputs = [], []
    with torch.no_grad():
        base_final = _log_probs(output_lens, base[L], L)
        base_top = base_final.argmax(-1)
        mine = parallel.mine([1] * L) or list(range(L))  # under torchrun: each process skips its share of blocks
        most = parallel.most_forwards(adapter, len(mine))
        for l in tqdm(mine, desc="skipping blocks", unit="block", disable=not progress):
            with skip_block(adapter, l, None if means is None else means[l]):
                skipped = stream(adapter.hidden_states(ids))
            for name, lens in lenses.items():
                for m in range(l + 1, L + 1):
                    p = _log_probs(lens, base[m], m)
                    q = _log_probs(lens, skipped[m], m)
                    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
                    effects.append({"lens": name, "skipped": l, "layer": m, "kl": float(kl.mean()),
                                    "top1_changed": float((p.argmax(-1) != q.argmax(-1)).float().mean())})
            q = _log_probs(output_lens, skipped[L], L)
            kl_out = mean_interval((base_final.exp() * (base_final - q)).sum(-1).cpu().numpy(), texts_of, seed=seed)
            acc = mean_interval((q.argmax(-1) == targets).float().cpu().numpy(), texts_of, seed=seed)
            outputs.append({"skipped": l, "kl_output": kl_out[0], "kl_output_ci_low": kl_out[1],
                            "kl_output_ci_high": kl_out[2], "accuracy": acc[0], "accuracy_ci_low": acc[1],
                            "accuracy_ci_high": acc[2],
                            "agreement": float((q.argmax(-1) == base_top).float().mean()), "n": len(targets)})
    parallel.even_forwards(adapter, len(mine), most)
    out = pd.DataFrame(parallel.joined(outputs)).sort_values("skipped", kind="stable")
    out = out.reset_index(drop=True)
    out["accuracy_unskipped"] = float((base_top == targets).float().mean())
    effects = pd.DataFrame(parallel.joined(effects))
    effects = effects.sort_values("skipped", kind="stable").reset_index(drop=True)  # in the order of one process
    usage = Usage("positions", num_positions, available, len(targets), source, prefix_note(tokenizer))
    return ViewResult("layer-skip", {"effects": effects, "output": out}, _summary(out, mode), {"mode": mode},
                      usage=[usage])


def _summary(out: pd.DataFrame, mode: str) -> list[str]:
    worst = out.sort_values("kl_output", ascending=False).head(3)
    least = out.sort_values("kl_output").head(3)

    def fmt(rows):
        return ", ".join(f"{int(r.skipped)} ({describe(r.kl_output, r.kl_output_ci_low, r.kl_output_ci_high, 2)})"
                         for r in rows.itertuples())

    acc = out.accuracy_unskipped.iloc[0]
    half = len(out) // 2
    return [f"skipping a block ({mode} update), output KL in nats: largest for blocks {fmt(worst)}; "
            f"smallest for {fmt(least)}",
            f"accuracy {acc:.0%} unskipped; mean with one block skipped: first half {out.accuracy[:half].mean():.0%}, "
            f"second half {out.accuracy[half:].mean():.0%} (mean output KL {out.kl_output[:half].mean():.2f} vs "
            f"{out.kl_output[half:].mean():.2f})"]


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    return layer_skip_view(*ctx.parts, texts, ctx.cfg.skip_positions, mode=ctx.cfg.skip_mode, **ctx.sampling,
                           source=source)


plot = table_plot("plot_layer_skip", "effects", "output")
