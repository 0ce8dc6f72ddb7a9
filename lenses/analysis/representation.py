"""Per-layer representation quality (Skean, Arefin, LeCun, Shwartz-Ziv 2024, arXiv 2412.09563).

All metrics read the residual stream ``hidden[l]`` of every layer ``l = 0..L`` (see
`lenses.model.adapter` for the convention), prompt by prompt, so no ``[layers x tokens x d]`` tensor of
more than one prompt is kept.

Definitions (``Z``: the ``T x D`` token matrix of one prompt at one layer):

- **prompt entropy**: rows of ``Z`` mean-centred, then L2-normalised; Gram ``K = Z Z^T`` scaled
  to unit trace; matrix-based Renyi entropy of order alpha,
  ``S_alpha = log(sum_i lambda_i^alpha) / (1 - alpha)`` (alpha = 1: ``-sum lambda log lambda``,
  von Neumann), over the eigenvalues ``lambda`` of ``K / tr K``; divided by ``log`` of the rank
  bound ``min(T - 1, D)`` so it lies in [0, 1]. The eigenvalues come from the smaller of
  ``Z Z^T`` and ``Z^T Z`` (same non-zero spectrum), in float64.
- **dataset entropy**: the same on the ``N x D`` matrix of mean-pooled prompt vectors.
- **curvature**: mean angle (radians) between consecutive differences
  ``v_k = z_{k+1} - z_k`` of the raw token vectors: 0 for a straight path, pi for back-and-forth.
- **effective rank** (Roy & Vetterli 2007): ``exp`` of the Shannon entropy of the normalised
  singular values of the centred ``Z``.
- **augmentation invariance**, between each prompt's mean-pooled vector and those of augmented
  copies (split words, character edits, keyboard typos; seeded, offline):
  *InfoNCE*: ``-mean_i log softmax_j(cos(x_i, y_j) / tau)[i]`` (lower = more invariant; its floor
  for identical views is reached when ``cos = 1`` on the diagonal);
  *LiDAR* (Thilak et al. 2023): effective rank of the LDA matrix
  ``Sw^-1/2 Sb Sw^-1/2`` with prompts as classes and augmentations as samples;
  *DiME* (Skean et al. 2023): ``E_perm[S(K_x o K_y^perm)] - S(K_x o K_y)`` on unit-trace
  Hadamard products of the two views' Gram matrices (higher = more shared information).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult
from lenses.base.errors import DataError
from lenses.model.adapter import ModelAdapter
from lenses.pages.plots import plot_representation
from lenses.text import convention
from lenses.text.data import read_utf8
from lenses.tracing import parallel

# --------------------------------------------------------------------------- spectra


def _normalise_rows(z: torch.Tensor, center: bool = True) -> torch.Tensor:
    z = z.double()
    if center:
        z = z - z.mean(0, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gram_spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``Z Z^T / tr`` via the smaller Gram form (float64, clipped at 0)."""
    z = z.double()
    small = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    ev = torch.linalg.eigvalsh(small).clamp_min(0)
    total = ev.sum()
    return ev / total if total > 0 else ev


def renyi_entropy(eigenvalues: torch.Tensor, alpha: float = 1.0) -> float:
    """Matrix-based Renyi entropy (nats) of a unit-trace spectrum."""
    lam = eigenvalues[eigenvalues > 0]
    if lam.numel() == 0:
        return 0.0
    if abs(alpha - 1.0) < 1e-12:
        return float(-(lam * lam.log()).sum())
    return float(torch.log((lam**alpha).sum()) / (1 - alpha))


def normalised_entropy(z: torch.Tensor, alpha: float = 1.0, center: bool = True) -> float:
    """Entropy of the row Gram matrix of ``z`` divided by log of the rank bound: in [0, 1]."""
    t, d = z.shape
    bound = min(t - 1 if center else t, d)
    if bound < 2:
        return 0.0
    return renyi_entropy(gram_spectrum(_normalise_rows(z, center)), alpha) / math.log(bound)


def curvature(z: torch.Tensor) -> float:
    """Mean angle between consecutive token-to-token difference vectors (radians)."""
    if z.shape[0] < 3:
        return float("nan")
    v = torch.diff(z.double(), dim=0)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (v[1:] * v[:-1]).sum(-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean())


def effective_rank(z: torch.Tensor) -> float:
    s = torch.linalg.svdvals(z.double() - z.double().mean(0, keepdim=True))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# --------------------------------------------------------------------------- invariance


def infonce(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> float:
    """InfoNCE loss between paired views ``x[i] <-> y[i]`` ([N, D] each), cosine similarity."""
    x, y = _normalise_rows(x, center=False), _normalise_rows(y, center=False)
    logits = x @ y.T / temperature
    return float(-torch.log_softmax(logits, dim=1).diagonal().mean())


def lidar(views: torch.Tensor, delta: float = 1e-6, eps: float = 1e-12) -> float:
    """LiDAR of ``views`` [N classes, Q samples, D]: effective rank of the LDA matrix."""
    v = views.double()
    n, q, d = v.shape
    means = v.mean(1)  # [N, D]
    centred_means = means - means.mean(0)
    sb = centred_means.T @ centred_means / max(1, n - 1)
    within = (v - means[:, None]).reshape(-1, d)
    sw = within.T @ within / max(1, n * (q - 1)) + delta * torch.eye(d, dtype=v.dtype)
    w_ev, w_vec = torch.linalg.eigh(sw)
    inv_sqrt = w_vec @ torch.diag(w_ev.clamp_min(eps).rsqrt()) @ w_vec.T
    ev = torch.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt).clamp_min(0)
    p = ev / ev.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _unit_trace(k: torch.Tensor) -> torch.Tensor:
    return k / k.trace()


def dime(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, permutations: int = 10, seed: int = 0) -> float:
    """DiME between paired views ([N, D] each): how much pairing lowers joint matrix entropy."""
    x, y = _normalise_rows(x, center=False), _normalise_rows(y, center=False)
    kx, ky = x @ x.T, y @ y.T

    def joint(k2: torch.Tensor) -> float:
        return renyi_entropy(torch.linalg.eigvalsh(_unit_trace(kx * k2)).clamp_min(0), alpha)

    g = torch.Generator().manual_seed(seed)
    shuffled = []
    for _ in range(permutations):
        p = torch.randperm(x.shape[0], generator=g)
        shuffled.append(joint(ky[p][:, p]))
    return float(np.mean(shuffled) - joint(ky))


# --------------------------------------------------------------------------- augmentations

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_KEYBOARD):
    for _c, _ch in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        near += [_KEYBOARD[rr][_c] for rr in (_r - 1, _r + 1) if 0 <= rr < 3 and _c < len(_KEYBOARD[rr])]
        _NEIGHBOURS[_ch] = "".join(near)


def augment(text: str, kind: str, rate: float = 0.15, seed: int = 0) -> str:
    """A perturbed copy of ``text``: ``split`` (a space inside words), ``edit`` (delete/insert/
    substitute a letter) or ``typo`` (a QWERTY neighbour); ``rate`` of the words are touched."""
    rng = random.Random(f"{seed}|{kind}|{text}")
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) < 3 or rng.random() >= rate:
            continue
        k = rng.randrange(1, len(w) - 1)
        if kind == "split":
            words[i] = w[:k] + " " + w[k:]
        elif kind == "edit":
            op = rng.choice("dis")
            c = rng.choice("abcdefghijklmnopqrstuvwxyz")
            words[i] = w[:k] + w[k + 1 :] if op == "d" else w[:k] + c + w[k:] if op == "i" else w[:k] + c + w[k + 1 :]
        elif kind == "typo":
            ch = w[k].lower()
            if ch in _NEIGHBOURS:
                words[i] = w[:k] + rng.choice(_NEIGHBOURS[ch]) + w[k + 1 :]
        else:
            raise ValueError(f"unknown augmentation {kind!r}: use split, edit or typo")
    return " ".join(words)


AUGMENTATIONS = ("split", "edit", "typo")


# --------------------------------------------------------------------------- the view


def _dataset_metrics(pooled: dict, augmentations: tuple[str, ...], alpha: float, n_layers: int, n_prompts: int
                     ) -> list[tuple]:
    """``(layer, metric, value)`` of the metrics over the whole set of mean-pooled prompts (and their
    augmentations): dataset entropy, InfoNCE, DiME, LiDAR."""
    stacks = {k: torch.stack(v, dim=1) for k, v in pooled.items()}  # [L+1, N, D]
    dataset_rows = []
    for layer in range(n_layers):
        orig = stacks["original"][layer]
        dataset_rows.append((layer, "dataset_entropy", normalised_entropy(orig, alpha)))
        if augmentations and n_prompts >= 2:
            views = torch.stack([stacks[k][layer] for k in ("original", *augmentations)], dim=1)  # [N, Q, D]
            aug = [stacks[k][layer] for k in augmentations]
            dataset_rows.append((layer, "infonce", float(np.mean([infonce(orig, a) for a in aug]))))
            dataset_rows.append((layer, "dime", float(np.mean([dime(orig, a, alpha) for a in aug]))))
            dataset_rows.append((layer, "lidar", lidar(views)))

    return dataset_rows


def _prompt_rows(pid: int, hidden: torch.Tensor, alpha: float) -> list[tuple]:
    """``(prompt_id, layer, metric, value)`` of one prompt's token metrics at every layer (``hidden`` [L+1, T, D])."""
    rows = []
    for layer, z in enumerate(hidden):
        rows.append((pid, layer, "prompt_entropy", normalised_entropy(z, alpha)))
        rows.append((pid, layer, "curvature", curvature(z)))
        rows.append((pid, layer, "effective_rank", effective_rank(z)))
    return rows


def representation_view(
    adapter: ModelAdapter,
    tokenizer,
    prompts: list[str],
    alpha: float = 1.0,
    max_tokens: int = 64,
    augmentations: tuple[str, ...] = AUGMENTATIONS,
    seed: int = 0,
    progress: bool = True,
    drop_first_token: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer summary (``layer, relative_depth, metric, mean, std, q10, q50, q90, n``) and
    per-prompt values (``prompt_id, layer, metric, value``) of every metric.

    Each prompt is read as in use (the tokenizer's prefix, e.g. BOS, first: `lenses.text.convention`); those
    special positions are left out. Without a prefix, ``drop_first_token`` leaves out position 0, whose
    residual stream in many models grows a few huge coordinates mid-depth (an attention sink) and then
    dominates every token-Gram metric.
    """
    from tqdm.auto import tqdm

    n_layers = adapter.num_layers + 1
    rows = []
    pooled = {kind: [] for kind in ("original", *augmentations)}  # each: list of [layers, D]

    conv = convention.of(tokenizer)
    skip = conv.first or int(drop_first_token)  # the tokenizer's special prefix (BOS) is never a token vector

    def run(text: str) -> torch.Tensor:
        ids = torch.tensor([conv.encode(tokenizer, text)[:max_tokens]])
        hidden = adapter.hidden_states(ids)[:, 0].float().cpu()  # [L+1, T, D]
        return hidden[:, skip:]

    mine, most = _my_prompts(adapter, tokenizer, prompts, max_tokens, len(augmentations))
    for pid in tqdm(mine, desc="representation", disable=not progress):
        text = prompts[pid]
        hidden = run(text)
        pooled["original"].append((pid, hidden.mean(1)))
        rows += _prompt_rows(pid, hidden, alpha)
        for i, kind in enumerate(augmentations):
            pooled[kind].append((pid, run(augment(text, kind, seed=seed + i)).mean(1)))
    parallel.even_forwards(adapter, len(mine) * (1 + len(augmentations)), most)
    per_prompt = parallel.merged(pd.DataFrame(rows, columns=["prompt_id", "layer", "metric", "value"]),
                                 ["prompt_id"])  # stable: each prompt's rows in the order one process makes them
    pooled = {kind: [v for _, v in sorted(parallel.joined(vs), key=lambda pv: pv[0])] for kind, vs in pooled.items()}

    dataset_rows = _dataset_metrics(pooled, augmentations, alpha, n_layers, len(prompts))
    summary = (
        per_prompt.groupby(["layer", "metric"])["value"]
        .agg(mean="mean", std="std", q10=lambda s: s.quantile(0.1), q50="median", q90=lambda s: s.quantile(0.9),
             n="count")
        .reset_index()
    )
    dataset = pd.DataFrame(dataset_rows, columns=["layer", "metric", "mean"]).assign(n=len(prompts))
    summary = pd.concat([summary, dataset], ignore_index=True)
    summary.insert(1, "relative_depth", summary.layer / (n_layers - 1))
    return summary.sort_values(["metric", "layer"]).reset_index(drop=True), per_prompt


def _my_prompts(adapter, tokenizer, prompts: list[str], max_tokens: int, augmentations: int
                ) -> tuple[list[int], int]:
    """The prompts this process reads under torchrun (balanced by tokens, `lenses.tracing.parallel`), or all, and
    the forward passes the busiest process makes (`parallel.most_forwards`)."""
    lengths = [min(len(convention.encode(tokenizer, t)), max_tokens) for t in prompts]
    share = parallel.mine(lengths)
    mine = list(range(len(prompts))) if share is None else share
    return mine, parallel.most_forwards(adapter, len(mine) * (1 + augmentations))


def read_prompts(source: str | None, texts_of) -> list[str]:
    """Prompts: the lines of a .txt file, else the paragraphs of 30+ words of a corpus
    (``texts_of()`` reads it)."""
    from pathlib import Path

    if source and str(source).endswith(".txt") and Path(source).is_file():
        return [ln.strip() for ln in read_utf8(Path(source)).splitlines() if ln.strip()]
    return [p for t in texts_of() for p in t.split("\n\n") if len(p.split()) >= 30]


MIN_TOKENS = 3  # token vectors a prompt needs for every metric (curvature reads two steps)


def run(ctx) -> ViewResult:
    cfg = ctx.cfg
    texts, source = ctx.view_texts
    prompts = read_prompts(cfg.corpus, lambda: texts)
    if cfg.corpus and str(cfg.corpus).endswith(".txt") and Path(cfg.corpus).is_file():
        source = f"the lines of {cfg.corpus}"
    skip = convention.of(ctx.tokenizer).first or int(cfg.drop_first_token)
    long_enough = [p for p in prompts
                   if len(convention.encode(ctx.tokenizer, p)[:cfg.prompt_tokens]) >= skip + MIN_TOKENS]
    short = len(prompts) - len(long_enough)
    prompts, available = long_enough, len(long_enough)
    if len(prompts) < 2:
        raise DataError(f"the representation view needs at least 2 prompts of {MIN_TOKENS}+ tokens read (30+ words, "
                        f"or lines of a .txt file); {short} were shorter. Pass more text with --corpus.")
    prompts = prompts[: cfg.num_prompts]
    notes = [f"first {cfg.prompt_tokens} tokens of each"] + (
        [f"{short} prompt(s) of fewer than {MIN_TOKENS} tokens after the first {skip} left out (curvature needs "
         f"{MIN_TOKENS})"] if short else [])
    if cfg.hist_layer is not None and cfg.hist_layer > ctx.adapter.num_layers:
        raise DataError(f"--hist-layer {cfg.hist_layer} is past the last layer ({ctx.adapter.num_layers}).")
    summary, per_prompt = representation_view(ctx.adapter, ctx.tokenizer, prompts, alpha=cfg.alpha,
                                              max_tokens=cfg.prompt_tokens, drop_first_token=cfg.drop_first_token,
                                              seed=cfg.seed, progress=cfg.progress)
    wide = summary.pivot(index="layer", columns="metric", values="mean")
    lines = [f"per-layer means over {len(prompts)} prompts:", wide.to_string(float_format=lambda v: f"{v:.3f}")]
    return ViewResult("representation", {"layers": summary, "prompts": per_prompt}, lines,
                      {"hist_layer": cfg.hist_layer},
                      usage=[Usage("prompts", cfg.num_prompts, available, len(prompts), source, notes)])


def plot(result: ViewResult, path):
    t = result.tables
    return plot_representation(t["layers"], t["prompts"], path, result.settings.get("hist_layer"))
