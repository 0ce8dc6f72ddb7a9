"""The Jacobian-lens fit's backward passes written out, for blocks of the Llama family.

The fit runs about ``d / dim_batch`` backward passes per prompt, all through the same forward pass. Autograd
replays the whole saved graph in each one: every activation's derivative re-derived, every norm's backward
rebuilt, the prompt copied once per cotangent. But at one prompt the blocks' Jacobian is one fixed linear map.
`capture` runs the prompt once, recomputes each block from its input with explicit formulas, checks them
against the model's own block outputs (the numeric proof that the block is what the formulas say: a block of
another kind, or a sliding window shorter than the prompt, fails it and the fit falls back to autograd), and
keeps only what the transposed map needs. `backward` then applies it to a batch of cotangents: per block, the
weights' input-gradient products (in ``dtype``: bfloat16 copies rounded stochastically, `jlens_half`), the
attention's four batched products over the kept probabilities, and a few elementwise products with
precomputed factors. The residual stream's gradient and every sum stay in float32.

With ``y = w * x / r(x)`` (an RMS norm) and ``m = silu(a) * b`` (the gated MLP), the transposed maps are

    g_x = (g_y * w - x/r * <g_y * w, x/r> / d) / r                 (per position)
    g_a = g_m * b * silu'(a),   g_b = g_m * silu(a)
    g_S = P * (g_P - <g_o, o>),  g_P = g_o V^T,  g_q = g_S K s,  g_k = g_S^T Q s,  g_v = P^T g_o

(``s`` the attention's scale; rotary embeddings transposed: ``g_q = g*cos + R^T(g*sin)``). Queries are the valid
positions only; keys include the cached first positions, whose gradients no source needs. Tested against
autograd in float64 (tests/test_jlens_written.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lenses.jobs import jlens_half
from lenses.model.block_parts import parts_tolerance

_BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def unsupported(adapter) -> str | None:
    """Why the written-out backward cannot serve this model (None: it can, subject to `capture`'s proof)."""
    if next(adapter.model.parameters()).dtype not in (torch.float32, torch.float64):
        return "the model is not in float32 or float64"
    if _rotary(adapter) is None:
        return "no rotary-embedding module outside the blocks"
    for i, block in enumerate(adapter.layers):
        names = {n for n, _ in block.named_children()}
        if names != _BLOCK:
            return f"block {i} is not a Llama-family block (children {sorted(names)})"
        attn, mlp = block.self_attn, block.mlp
        children = ({n for n, _ in attn.named_children()} - {"rotary_emb"}, {n for n, _ in mlp.named_children()})
        if children != (_ATTN, _MLP):
            return f"block {i}'s attention or MLP has other parts than q/k/v/o and gate/up/down"
        linears = [getattr(attn, n) for n in sorted(_ATTN)] + [getattr(mlp, n) for n in sorted(_MLP - {"act_fn"})]
        if any(type(m) is not nn.Linear or type(m.weight.data) is not torch.Tensor for m in linears):
            return f"block {i}'s projections are not plain linear layers (quantized or sharded)"
        if not all(hasattr(attn, a) for a in ("scaling", "head_dim")):
            return f"block {i}'s attention does not state its scale and head size"
        if not _acts_as(block, mlp):
            return f"block {i}'s norms are not w * x / rms(x) or its MLP's activation is not SiLU"
    return None


def describe(adapter, sharded: bool = False) -> str:
    """How the fit's backward passes run on this model, in words (printed by the fit and the benchmark)."""
    why = "the blocks are sharded (--fsdp)" if sharded else unsupported(adapter)
    return "written out (Llama-family blocks)" if why is None else f"autograd ({why})"


def _acts_as(block, mlp) -> bool:
    """The norms and the activation, checked on probe inputs against the forms the backward is written for."""
    with torch.no_grad():
        w = block.input_layernorm.weight
        x = torch.linspace(-3, 3, w.numel(), dtype=w.dtype, device=w.device)[None]
        norms = all(torch.allclose(n(x), n.weight * x * _rms(x, n), rtol=1e-4, atol=1e-6)
                    for n in (block.input_layernorm, block.post_attention_layernorm))
        return norms and torch.allclose(mlp.act_fn(x), F.silu(x), rtol=1e-4, atol=1e-6)


def _rotary(adapter):
    inside = {id(m) for m in adapter.layers.modules()}
    return next((m for m in adapter.model.modules() if type(m).__name__.endswith("RotaryEmbedding")
                 and id(m) not in inside), None)


def _rms(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``1 / r(h)`` per position, for an RMS norm module ``norm``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


@dataclass
class _Block:
    """What one block's transposed map needs at one prompt (queries at the valid positions only)."""

    weights: dict  # name -> [out, in] matrix in the backward's dtype
    w1: torch.Tensor  # the norms' weights [d]
    w2: torch.Tensor
    r1: torch.Tensor  # 1/r at the valid positions [n, 1]
    x1: torch.Tensor  # x / r [n, d]
    r2: torch.Tensor
    x2: torch.Tensor
    fg: torch.Tensor  # b * silu'(a) [n, ffn]
    fu: torch.Tensor  # silu(a) [n, ffn]
    P: torch.Tensor  # probabilities [Hk, G*n, T] (query heads grouped by their key head)
    PvT: torch.Tensor  # P at the valid keys, transposed [Hk, n, G*n]
    O: torch.Tensor  # attention outputs before o_proj [Hk, G*n, hd]
    Qs: torch.Tensor  # rotated queries times the scale [Hk, G*n, hd]
    Ks: torch.Tensor  # rotated keys times the scale [Hk, T, hd]
    Vt: torch.Tensor  # values, transposed [Hk, hd, T]
    cos: torch.Tensor  # [n, hd]
    sin: torch.Tensor


@dataclass
class Written:
    """The blocks' transposed Jacobian at one prompt: `capture` makes it, `backward` applies it."""

    blocks: list  # _Block per block from the earliest source layer up; None below it
    first: int  # the earliest block kept
    skip: int  # the first valid position
    heads: tuple  # (H, Hk, hd)
    dtype: torch.dtype  # the weights' products run in it
    acc: torch.dtype  # the residual stream's gradient and the sums

    def backward(self, cotangent: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """``cotangent`` [B, n, d] at ``hidden[L]``'s valid positions -> ``[len(layers), B, d]``: the gradient at
        each layer's valid positions, averaged over them."""
        want, rows = set(layers), {}
        g = cotangent.to(self.acc)
        for k in range(len(self.blocks) - 1, self.first - 1, -1):
            g = self._block(self.blocks[k], g)
            if k in want:
                rows[k] = g.mean(1)
        return torch.stack([rows[k] for k in layers])

    def _block(self, b: _Block, g: torch.Tensor) -> torch.Tensor:
        B, n, d = g.shape
        W, dt = b.weights, self.dtype
        gm = (g.reshape(B * n, d).to(dt) @ W["down_proj"]).view(B, n, -1)
        gb = torch.mm((gm * b.fg).view(B * n, -1), W["gate_proj"])
        gb.addmm_((gm * b.fu).view(B * n, -1), W["up_proj"])
        g = g + _norm_back(gb.view(B, n, d), b.w2, b.r2, b.x2).to(g.dtype)
        go = (g.reshape(B * n, d).to(dt) @ W["o_proj"])
        gq, gk, gv = self._attention(b, go, B, n)
        ga = torch.mm(gq, W["q_proj"]).addmm_(gk, W["k_proj"]).addmm_(gv, W["v_proj"])
        return g.add_(_norm_back(ga.view(B, n, d), b.w1, b.r1, b.x1).to(g.dtype))

    def _attention(self, b: _Block, go: torch.Tensor, B: int, n: int):
        """The attention's transposed map: ``go`` [B*n, H*hd] -> the gradients at q, k and v [B*n, .]."""
        H, Hk, hd = self.heads
        G = H // Hk
        go = go.view(B, n, H, hd).transpose(1, 2).reshape(B, Hk, G * n, hd)
        gS = go @ b.Vt  # g_P [B, Hk, G*n, T]
        gS -= (go * b.O).sum(-1, keepdim=True).to(gS.dtype)
        gS *= b.P
        gq = _unrotate((gS @ b.Ks).view(B, H, n, hd), b.cos, b.sin)
        gk = _unrotate(gS[..., self.skip :].transpose(-1, -2) @ b.Qs, b.cos, b.sin)
        gv = b.PvT @ go
        return [t.transpose(1, 2).reshape(B * n, -1).to(self.dtype) for t in (gq, gk, gv)]


def _unrotate(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding transposed: ``g*cos + R^T(g*sin)`` with ``R^T(y) = (y2, -y1)``."""
    y1, y2 = (g * sin).chunk(2, -1)
    return torch.cat((y2, -y1), -1).add_(g * cos)


def _norm_back(gy: torch.Tensor, w: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An RMS norm transposed at one prompt: ``gy`` [B, n, d] at its output -> at its input (float32 or wider)."""
    gw = gy * w if gy.dtype == w.dtype else gy.to(w.dtype) * w
    dot = (gw * x).mean(-1, keepdim=True)
    return gw.sub_(x * dot).mul_(r)


def capture(adapter, ids: torch.Tensor, first: int, skip: int, dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None) -> Written | None:
    """Run ``ids`` [T] (the positions the fit reads: the last one already dropped) once; recompute every block
    from ``first`` up with the explicit formulas and keep its transposed map's factors. None where a block's
    recomputation differs from the model's own output (the proof fails: use autograd). ``dtype`` bfloat16: the
    weights' copies rounded stochastically from ``generator``; float32 or None: the model's own weights."""
    model_dtype = next(adapter.model.parameters()).dtype
    dtype = model_dtype if dtype is None or dtype == torch.float32 else dtype
    acc = jlens_half.sum_dtype(model_dtype)
    x = torch.as_tensor(ids).flatten()[None].to(adapter.device)
    with torch.no_grad():
        hidden = adapter.hidden_states(x)[:, 0]  # [L+1, T, d]
        pos = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = (t[0].to(model_dtype) for t in _rotary(adapter)(hidden[0][None], pos))
        blocks = [None] * adapter.num_layers
        for k in range(first, adapter.num_layers):
            made = _capture_block(adapter.layers[k], hidden[k], hidden[k + 1], cos, sin, skip, dtype, generator)
            if made is None:
                return None
            blocks[k] = made
    attn = adapter.layers[first].self_attn
    heads = (attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim, attn.head_dim)
    return Written(blocks, first, skip, heads, dtype, acc)


def _capture_block(block, h, after, cos, sin, skip, dtype, generator) -> _Block | None:
    """One block recomputed from its input ``h`` [T, d]: its factors, or None where it is not ``after``."""
    attn, mlp, n1, n2 = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
    hd = attn.head_dim
    H, Hk = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    T, G, V = h.shape[0], H // Hk, slice(skip, None)
    r1 = _rms(h, n1)
    a = (h * r1).to(h.dtype) * n1.weight
    q, k, v = (m(a).view(T, -1, hd).transpose(0, 1) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = _rotate(q, cos, sin).contiguous(), _rotate(k, cos, sin).contiguous()
    scores = (q.view(Hk, G * T, hd) @ k.transpose(-1, -2)).view(H, T, T) * attn.scaling
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1), float("-inf"))
    P = scores.softmax(-1, dtype=torch.promote_types(h.dtype, torch.float32)).to(h.dtype)
    o = (P.view(Hk, G * T, T) @ v).view(H, T, hd)
    h2 = h + attn.o_proj(o.transpose(0, 1).reshape(T, H * hd))
    r2 = _rms(h2, n2)
    bn = (h2 * r2).to(h.dtype) * n2.weight
    gate, up = mlp.gate_proj(bn), mlp.up_proj(bn)
    out = h2 + mlp.down_proj(F.silu(gate) * up)
    if not float((out - after).abs().amax()) <= parts_tolerance(h, after):
        return None
    sg = torch.sigmoid(gate[V])
    weights = {name: _copy(getattr(part, name).weight.detach(), dtype, generator)
               for part, names in ((attn, _ATTN), (mlp, _MLP - {"act_fn"})) for name in sorted(names)}
    qv, ov = (t[:, V].reshape(Hk, G * (T - skip), hd) for t in (q * attn.scaling, o))
    Pv = P[:, V].reshape(Hk, G * (T - skip), T)
    cast = {"dtype": dtype}
    return _Block(weights, n1.weight.detach(), n2.weight.detach(), r1[V], (h * r1)[V], r2[V], (h2 * r2)[V],
                  (up[V] * sg * (1 + gate[V] * (1 - sg))).to(**cast), F.silu(gate[V]).to(**cast),
                  Pv.to(**cast).contiguous(), Pv[..., V].transpose(-1, -2).to(**cast).contiguous(),
                  ov.to(**cast).contiguous(), qv.to(**cast).contiguous(), (k * attn.scaling).to(**cast).contiguous(),
                  v.transpose(-1, -2).to(**cast).contiguous(), cos[V], sin[V])


def _copy(w: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """``w`` for the backward's products: itself in its own dtype, else a copy (bfloat16: rounded stochastically)."""
    if dtype == w.dtype:
        return w
    if dtype == torch.bfloat16 and w.dtype == torch.float32 and generator is not None:
        return jlens_half.stochastic_round(w, generator)
    return w.to(dtype)
