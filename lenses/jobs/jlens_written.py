"""The Jacobian-lens fit's backward passes written out, for blocks of the Llama and Gemma families.

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

With ``y = s * x / r(x)`` (an RMS norm; ``s`` its weight, or ``1 + w`` in Gemma's) and ``m = act(a) * b`` (the
gated MLP; ``act'`` taken by autograd once per prompt), the transposed maps are

    g_x = (g_y * s - x/r * <g_y * s, x/r> / d) / r                 (per position; per head for query/key norms)
    g_a = g_m * b * act'(a),   g_b = g_m * act(a)
    g_S = P * (g_P - <g_o, o>),  g_P = g_o V^T,  g_q = g_S K s,  g_k = g_S^T Q s,  g_v = P^T g_o

(``s`` the attention's scale; rotary embeddings transposed: ``g_q = g*cos + R^T(g*sin)``). Block forms: pre-norm
(Llama, Mistral, Qwen 2/3, SmolLM2, Gemma 1) and sandwich (Gemma 2/3: norms after each part too), with or without
per-head query/key norms. Queries are the valid
positions only; keys include the cached first positions, whose gradients no source needs. Tested against
autograd in float64 (tests/test_jlens_written.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch
from torch import nn

from lenses.jobs import jlens_half
from lenses.model.block_parts import parts_tolerance

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_FORMS = {  # the block's children -> which norm does what (None: that form has no such norm)
    frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}):
        ("input_layernorm", None, "post_attention_layernorm", None),
    frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"}):
        ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


def unsupported(adapter) -> str | None:
    """Why the written-out backward cannot serve this model (None: it can, subject to `capture`'s proof)."""
    if next(adapter.model.parameters()).dtype not in (torch.float32, torch.float64):
        return "the model is not in float32 or float64"
    if _rotary(adapter) is None:
        return "no rotary-embedding module outside the blocks"
    for i, block in enumerate(adapter.layers):
        why = _block_unsupported(block)
        if why:
            return f"block {i}: {why}"
    return None


def _block_unsupported(block) -> str | None:
    form = _FORMS.get(frozenset(n for n, _ in block.named_children()))
    if form is None:
        return f"not a Llama- or Gemma-family block (children {sorted(n for n, _ in block.named_children())})"
    attn, mlp = block.self_attn, block.mlp
    children = ({n for n, _ in attn.named_children()} - {"rotary_emb"}, {n for n, _ in mlp.named_children()})
    if children[0] - {"q_norm", "k_norm"} != set(_ATTN) or children[1] != set(_MLP) | {"act_fn"}:
        return "its attention or MLP has other parts than q/k/v/o (and query/key norms) and gate/up/down"
    if any(type(getattr(attn, n)) is not nn.Linear or type(getattr(attn, n).weight.data) is not torch.Tensor
           for n in _ATTN) or any(type(getattr(mlp, n)) is not nn.Linear for n in _MLP):
        return "its projections are not plain linear layers (quantized or sharded)"
    if not all(hasattr(attn, a) for a in ("scaling", "head_dim")) or getattr(attn, "attn_logit_softcapping", None):
        return "its attention does not state its scale and head size, or caps its scores (Gemma 2)"
    norms = [getattr(block, n) for n in form if n] + [getattr(attn, n) for n in ("q_norm", "k_norm") if
                                                      hasattr(attn, n)]
    if any(_scale(n) is None for n in norms):
        return "its norms are not s * x / rms(x) with s = w or 1 + w"
    return None


def describe(adapter, sharded: bool = False) -> str:
    """How the fit's backward passes run on this model, in words (printed by the fit and the benchmark)."""
    why = "the blocks are sharded (--fsdp)" if sharded else unsupported(adapter)
    return "written out (Llama/Gemma-family blocks)" if why is None else f"autograd ({why})"


def _scale(norm: nn.Module) -> torch.Tensor | None:
    """The RMS norm's effective scale ``s`` (its weight, or 1 + its weight), found on a probe input; None if neither."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    with torch.no_grad():
        x = torch.linspace(-3, 3, w.numel(), dtype=w.dtype, device=w.device)[None]
        y = norm(x)
        return next((s.detach() for s in (w, 1 + w) if torch.allclose(y, s * x * _rms(x, norm), rtol=1e-4,
                                                                        atol=1e-6)), None)


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
class _Norm:
    """An RMS norm at the prompt, ``y = s * x / r(x)``: what its transposed map needs at the kept positions."""

    s: torch.Tensor  # the effective scale [d]
    r: torch.Tensor  # 1/r [..., 1]
    x: torch.Tensor  # x/r [..., d]

    def back(self, gy: torch.Tensor) -> torch.Tensor:
        """``gy`` at the norm's output -> at its input (in the scale's dtype: float32 or wider)."""
        gw = gy.to(self.s.dtype) * self.s
        dot = (gw * self.x).mean(-1, keepdim=True)
        return gw.sub_(self.x * dot).mul_(self.r)


def _normed(norm: nn.Module, h: torch.Tensor, keep) -> tuple[torch.Tensor, _Norm]:
    """``norm(h)`` recomputed, and its `_Norm` at the positions ``keep`` (an index of ``h``)."""
    r, s = _rms(h, norm), _scale(norm)
    xr = h * r
    return xr.to(h.dtype) * s, _Norm(s, r[keep], xr[keep])


@dataclass
class _Block:
    """What one block's transposed map needs at one prompt (queries at the valid positions only)."""

    weights: dict  # name -> [out, in] matrix in the backward's dtype
    norms: list  # _Norm or None: before attention, after it, before the MLP, after it
    qk_norms: tuple  # (_Norm, _Norm) per head for queries [H, n, hd] and keys [Hk, n, hd], or (None, None)
    fg: torch.Tensor  # b * act'(a) [n, ffn]
    fu: torch.Tensor  # act(a) [n, ffn]
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
        pre_attn, post_attn, pre_mlp, post_mlp = b.norms
        gy = g if post_mlp is None else post_mlp.back(g)
        gm = (gy.reshape(B * n, d).to(dt) @ W["down_proj"]).view(B, n, -1)
        gb = torch.mm((gm * b.fg).view(B * n, -1), W["gate_proj"])
        gb.addmm_((gm * b.fu).view(B * n, -1), W["up_proj"])
        g = g + pre_mlp.back(gb.view(B, n, d)).to(g.dtype)
        gy = g if post_attn is None else post_attn.back(g)
        go = (gy.reshape(B * n, d).to(dt) @ W["o_proj"])
        gq, gk, gv = self._attention(b, go, B, n)
        ga = torch.mm(gq, W["q_proj"]).addmm_(gk, W["k_proj"]).addmm_(gv, W["v_proj"])
        return g.add_(pre_attn.back(ga.view(B, n, d)).to(g.dtype))

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
        if b.qk_norms[0] is not None:
            gq, gk = b.qk_norms[0].back(gq), b.qk_norms[1].back(gk)
        gv = b.PvT @ go
        return [t.transpose(1, 2).reshape(B * n, -1).to(self.dtype) for t in (gq, gk, gv)]


def _unrotate(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding transposed: ``g*cos + R^T(g*sin)`` with ``R^T(y) = (y2, -y1)``."""
    y1, y2 = (g * sin).chunk(2, -1)
    return torch.cat((y2, -y1), -1).add_(g * cos)


def capture(adapter, ids: torch.Tensor, first: int, skip: int, dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None) -> Written | None:
    """Run ``ids`` [T] (the positions the fit reads: the last one already dropped) once; recompute every block
    from ``first`` up with the explicit formulas and keep its transposed map's factors. None where a block's
    recomputation differs from the model's own output (the proof fails: use autograd). ``dtype`` bfloat16: the
    weights' copies rounded stochastically from ``generator``; float32 or None: the model's own weights."""
    model_dtype = next(adapter.model.parameters()).dtype
    dtype = model_dtype if dtype is None or dtype == torch.float32 else dtype
    x = torch.as_tensor(ids).flatten()[None].to(adapter.device)
    with torch.no_grad():
        hidden = adapter.hidden_states(x)[:, 0]  # [L+1, T, d]
        pos = torch.arange(x.shape[1], device=x.device)[None]
        blocks, rotary, angles = [None] * adapter.num_layers, _rotary(adapter), {}
        for k in range(first, adapter.num_layers):
            kind = getattr(adapter.layers[k].self_attn, "layer_type", None)
            if kind not in angles:
                angles[kind] = _angles(rotary, kind, hidden[0], pos)
            cos, sin = angles[kind]
            made = _capture_block(adapter.layers[k], hidden[k], hidden[k + 1], cos, sin, skip, dtype, generator)
            if made is None:
                return None
            blocks[k] = made
    attn = adapter.layers[first].self_attn
    heads = (attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim, attn.head_dim)
    return Written(blocks, first, skip, heads, dtype, jlens_half.sum_dtype(model_dtype))


def _angles(rotary, kind, h, pos) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's cos and sin [T, hd] for attention of layer type ``kind`` (Gemma 3 has two)."""
    args = (kind,) if kind is not None and "layer_type" in inspect.signature(rotary.forward).parameters else ()
    cos, sin = (t[0].to(h.dtype) for t in rotary(h[None], pos, *args))
    return cos, sin


def _capture_block(block, h, after, cos, sin, skip, dtype, generator) -> _Block | None:
    """One block recomputed from its input ``h`` [T, d]: its factors, or None where it is not ``after``."""
    attn, mlp = block.self_attn, block.mlp
    roles = [None if n is None else getattr(block, n) for n in _FORMS[frozenset(n for n, _ in block.named_children())]]
    V = slice(skip, None)
    a, n1 = _normed(roles[0], h, V)
    part, factors = _attention_forward(attn, a, cos, sin, skip)
    n1p = None
    if roles[1] is not None:
        part, n1p = _normed(roles[1], part, V)
    h2 = h + part
    bn, n2 = _normed(roles[2], h2, V)
    gate, up = mlp.gate_proj(bn), mlp.up_proj(bn)
    with torch.enable_grad():
        z = gate[V].detach().requires_grad_(True)
        act = mlp.act_fn(z)
        slope, = torch.autograd.grad(act.sum(), z)
    part, n2p = mlp.down_proj(mlp.act_fn(gate) * up), None
    if roles[3] is not None:
        part, n2p = _normed(roles[3], part, V)
    if not float((h2 + part - after).abs().amax()) <= parts_tolerance(h, after):
        return None
    weights = {name: _copy(getattr(owner, name).weight.detach(), dtype, generator)
               for owner, names in ((attn, _ATTN), (mlp, _MLP)) for name in names}
    return _Block(weights, [n1, n1p, n2, n2p], factors.pop("qk_norms"), (up[V] * slope).to(dtype),
                  act.detach().to(dtype), **{k: v.to(dtype).contiguous() for k, v in factors.items()},
                  cos=cos[V], sin=sin[V])


def _attention_forward(attn, a, cos, sin, skip):
    """The attention recomputed on the normed input ``a`` [T, d]: its output after o_proj, and its factors."""
    hd = attn.head_dim
    H, Hk = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    T, G, V = a.shape[0], H // Hk, slice(skip, None)
    q, k, v = (m(a).view(T, -1, hd).transpose(0, 1) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    qk_norms = (None, None)
    if hasattr(attn, "q_norm"):
        (q, nq), (k, nk) = _normed(attn.q_norm, q, (slice(None), V)), _normed(attn.k_norm, k, (slice(None), V))
        qk_norms = (nq, nk)
    q, k = _rotate(q, cos, sin).contiguous(), _rotate(k, cos, sin).contiguous()
    scores = (q.view(Hk, G * T, hd) @ k.transpose(-1, -2)).view(H, T, T) * attn.scaling
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1), float("-inf"))
    P = scores.softmax(-1, dtype=torch.promote_types(a.dtype, torch.float32)).to(a.dtype)
    o = (P.view(Hk, G * T, T) @ v).view(H, T, hd)
    out = attn.o_proj(o.transpose(0, 1).reshape(T, H * hd))
    n = T - skip
    Pv = P[:, V].reshape(Hk, G * n, T)
    return out, {"qk_norms": qk_norms, "P": Pv, "PvT": Pv[..., V].transpose(-1, -2),
                 "O": o[:, V].reshape(Hk, G * n, hd), "Qs": (q * attn.scaling)[:, V].reshape(Hk, G * n, hd),
                 "Ks": k * attn.scaling, "Vt": v.transpose(-1, -2)}


def _copy(w: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """``w`` for the backward's products: itself in its own dtype, else a copy (bfloat16: rounded stochastically)."""
    if dtype == w.dtype:
        return w
    if dtype == torch.bfloat16 and w.dtype == torch.float32 and generator is not None:
        return jlens_half.stochastic_round(w, generator)
    return w.to(dtype)
