"""Cross-task activation patching (Gupta et al. 2025, arXiv 2510.18871v2, causal checks): does the
layer at which patching switches the model's task match the layer at which the lenses read it?

For a *source* prompt of task S and a *target* prompt of task T (each task has a label set, e.g.
" positive"/" negative"), the source's ``hidden[l]`` at its last position is written into the
target's forward pass at the target's last position and layer l (our convention: the input of
block l; ``hidden[l]`` is the output of block l-1 in "block output" conventions), the rest of the
model runs, and the output's top-1 is classified as a label of T, of S, or neither, with the
probability mass on each label set. Per pair:

- switch layer: the first l from which S's labels get more probability than T's labels at every
  later layer (``switch_first``: the first l where they do at all);
- lens switch (per lens): the same rule applied to the lens reading the *unpatched* source prompt's
  ``hidden[l]`` (S's labels against T's): the layer from which the lens says the source's answer
  format is there to be carried over (``lens_first_<lens>``: first layer at all; early layers,
  where both masses are near zero, make that one noisy).

The finding of the paper is that the two agree; the summary gives both with bootstrap intervals.
Shipped tasks (``lenses/datasets/tasks``, written for this project by ``scripts/make_tasks.py``):
``sentiment`` (positive/negative), ``yesno``, ``continent`` (Africa/Europe/Asia), and ``mcq`` (the
option letters of the MCQ view's questions). Your own: JSONL lines ``{prompt, labels, answer}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, encode, plain_ids, require, table_plot
from lenses.base import schema
from lenses.base.errors import DataError
from lenses.kinds.lens import LogitLens
from lenses.model.intervene import last_stream
from lenses.text.data import jsonl_records
from lenses.text.questions import HEADER, format_question, read_mcq
from lenses.tracing.depth import onset_layer, settled_layer
from lenses.tracing.intervals import mean_interval

SHIPPED = ("sentiment", "yesno", "continent", "mcq")


@dataclass
class Task:
    name: str
    prompts: list[list[int]]  # token ids
    labels: list[int]  # the label set (token ids)
    label_names: list[str]


def tasks_dir() -> Path:
    return Path(str(resources.files("lenses") / "datasets" / "tasks"))


def _mcq_rows(n: int = 60) -> list[dict]:
    qs = read_mcq()
    prefix = HEADER + "".join(format_question(q, solved=True) for q in qs[:2])
    return [{"prompt": prefix + format_question(q, solved=False), "labels": [" A", " B", " C", " D"],
             "answer": " " + q["answer"]} for q in qs[2: 2 + n]]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; give a shipped task ({', '.join(SHIPPED)}) or a JSONL "
                        "file of {prompt, labels, answer} lines.")
    rows = []
    for where, row in jsonl_records(path):
        rows.append(schema.check(row, schema.TASK_ROW, where, schema.TASK_EXAMPLE))
    require(bool(rows), f"{path} holds no prompts.")
    return rows


def read_task(spec: str, tokenizer, first_token: bool = False) -> Task:
    """A task by shipped name or JSONL path. Labels must be single tokens; with ``first_token`` a
    multi-token label stands for its first token (two labels with the same first token are refused)."""
    name = spec
    if spec == "mcq":
        rows = _mcq_rows()
    elif spec in SHIPPED:
        rows = _read_rows(tasks_dir() / f"{spec}.jsonl")
    else:
        rows, name = _read_rows(Path(spec)), Path(spec).stem
    label_names = list(dict.fromkeys(x for r in rows for x in r["labels"]))
    ids = {x: plain_ids(tokenizer, x) for x in label_names}
    multi = [f"{x!r} ({len(t)} tokens)" for x, t in ids.items() if len(t) != 1]
    if multi and not first_token:
        raise DataError(f"task {name}: labels {', '.join(multi)} are not single tokens for this tokenizer. Use "
                        "single-token labels (a leading space often helps), or pass --first-token to let each "
                        "label stand for its first token.")
    firsts = [t[0] for t in ids.values() if t]
    if len(set(firsts)) != len(firsts):
        raise DataError(f"task {name}: two labels share their first token, so they cannot be told apart.")
    return Task(name, [encode(tokenizer, r["prompt"]) for r in rows], firsts, label_names)


def read_tasks(spec: str, tokenizer, first_token: bool = False) -> list[Task]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    require(len(names) >= 2, f"patching needs at least two tasks (got {spec!r}); e.g. --tasks sentiment,yesno.")
    tasks = [read_task(n, tokenizer, first_token) for n in names]
    for a in tasks:
        for b in tasks:
            if a is not b and set(a.labels) & set(b.labels):
                raise DataError(f"tasks {a.name} and {b.name} share labels; cross-task patching needs disjoint "
                                "label sets.")
    return tasks


def patching_view(adapter, tokenizer, lenses: dict, tasks: list[Task], num_pairs: int = 10,
                  positions: str = "last", seed: int = 0, progress: bool = False, batch_size: int = 1) -> ViewResult:
    """``num_pairs`` random (source, target) prompt pairs for every ordered pair of tasks."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    jobs = [(s, t, rng.randrange(len(s.prompts)), rng.randrange(len(t.prompts)))
            for s in tasks for t in tasks if s is not t for _ in range(num_pairs)]
    L = adapter.num_layers
    output_lens = LogitLens(adapter)  # layer L of any lens is the model's own output
    rows, lens_rows = [], []
    for pair, (src, tgt, i, j) in enumerate(tqdm(jobs, desc="patching", unit="pair", disable=not progress)):
        s_ids, t_ids = torch.tensor([src.prompts[i]]), torch.tensor([tgt.prompts[j]])
        if positions == "all" and s_ids.shape[1] != t_ids.shape[1]:
            raise DataError(f"--positions all needs source and target prompts of the same length; {src.name} "
                            f"prompt {i} has {s_ids.shape[1]} tokens and {tgt.name} prompt {j} has "
                            f"{t_ids.shape[1]}. Use --positions last, or tasks with prompts of equal length.")
        hidden = adapter.hidden_states(s_ids)[:, 0]  # [L+1, n, d]: the one extra copy held
        S, T = torch.tensor(src.labels), torch.tensor(tgt.labels)
        with torch.no_grad():
            out = output_lens(_patched_outputs(adapter, t_ids, hidden, positions), L)
        probs = torch.softmax(out.float(), -1).cpu()
        for layer in range(L + 1):
            p = probs[layer]
            top = int(p.argmax())
            rows.append({"pair": pair, "source_task": src.name, "target_task": tgt.name, "source_prompt": i,
                         "target_prompt": j, "layer": layer, "mass_source": float(p[S].sum()),
                         "mass_target": float(p[T].sum()),
                         "outcome": "source" if top in src.labels else "target" if top in tgt.labels else "neither"})
        with torch.no_grad():
            for name, lens in lenses.items():
                for layer in range(L + 1):
                    q = torch.softmax(lens(hidden[layer, -1:], layer).float(), -1)[0].cpu()
                    lens_rows.append({"pair": pair, "lens": name, "layer": layer, "mass_source": float(q[S].sum()),
                                      "mass_target": float(q[T].sum())})
    layers, reads = pd.DataFrame(rows), pd.DataFrame(lens_rows)
    pairs = _pair_table(layers, reads)
    return ViewResult("patching", {"layers": layers, "lens": reads, "pairs": pairs},
                      _summary(pairs, list(lenses), L, seed))


def _patched_outputs(adapter, t_ids: torch.Tensor, hidden: torch.Tensor, positions: str) -> torch.Tensor:
    """``hidden[L]`` at the target's last position with the source's ``hidden[l]`` patched in, for every l
    (row l of one batch). Patching the last position leaves every earlier position as it was (the model
    is causal), so the target's prefix runs once and its cache serves all L+1 rows; models whose cache
    cannot be copied that way run the whole target in each row (same result, slower; said once)."""
    L = adapter.num_layers
    if positions == "last" and t_ids.shape[1] > 1:
        edits = {layer: _writer(hidden[layer, -1], positions, layer) for layer in range(L + 1)}
        try:
            cache = adapter.prefix_cache(t_ids[:, :-1], repeat=L + 1)
            if cache is None:
                raise TypeError("the model returns no reusable cache")
            return last_stream(adapter, t_ids[:, -1:].repeat(L + 1, 1), edits, **cache)
        except (AttributeError, TypeError, ValueError, NotImplementedError) as e:
            if not _NOTED:
                _NOTED.append(e)
                print(f"note: this model's cache cannot be reused ({type(e).__name__}); patching runs each "
                      "target in full (same result, slower).")
    edits = {layer: _writer(hidden[layer] if positions == "all" else hidden[layer, -1], positions, layer)
             for layer in range(L + 1)}
    return last_stream(adapter, t_ids.repeat(L + 1, 1), edits)


_NOTED: list = []


def _writer(patch: torch.Tensor, positions: str, row: int):
    """An edit writing ``patch`` into batch row ``row`` (every position, or the last)."""
    def fn(h):
        h = h.clone()
        if positions == "all":
            h[row] = patch.to(h)
        else:
            h[row, -1] = patch.to(h)
        return h

    return fn


def _wins(g: pd.DataFrame) -> tuple[float, float]:
    """(first layer where the source's labels outweigh the target's, first layer from which they do at
    every later layer); NaN when never."""
    win = (g.sort_values("layer").mass_source > g.sort_values("layer").mass_target).to_numpy()[None]
    return float(onset_layer(np.where(win, 1, 2), 1)[0]), float(settled_layer(win)[0])


def _pair_table(layers: pd.DataFrame, reads: pd.DataFrame) -> pd.DataFrame:
    first = layers.drop_duplicates("pair").set_index("pair")[["source_task", "target_task"]]
    wins = layers.groupby("pair").apply(_wins, include_groups=False)
    out = first.assign(switch_first=wins.str[0], switch_layer=wins.str[1])
    last = layers[layers.layer == layers.layer.max()].set_index("pair")
    out["source_output_in_labels"] = last.outcome == "source"
    for lens, g in reads.groupby("lens", sort=False):
        wins = g.groupby("pair").apply(_wins, include_groups=False)
        out[f"lens_first_{lens}"] = wins.str[0]
        out[f"lens_switch_{lens}"] = wins.str[1]
    return out.reset_index()


def bootstrap_ci(values, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (NaN dropped) and its 95% interval, each prompt pair resampled on its own
    (`lenses.tracing.intervals.mean_interval`: the pairs are independent draws)."""
    v = np.asarray(values, dtype=float)
    return mean_interval(v, np.arange(len(v)), seed=seed)


def _summary(pairs: pd.DataFrame, lens_names: list[str], L: int, seed: int) -> list[str]:
    m, lo, hi = bootstrap_ci(pairs.switch_layer, seed)
    lines = [f"switch layer (patched source's labels win from there on): {m:.1f} [95% CI {lo:.1f}, {hi:.1f}] "
             f"of {L}, {pairs.switch_layer.notna().sum()} of {len(pairs)} pairs switch"]
    for lens in lens_names:
        col = f"lens_switch_{lens}"
        m2, lo2, hi2 = bootstrap_ci(pairs[col], seed)
        d, dlo, dhi = bootstrap_ci(pairs.switch_layer - pairs[col], seed)
        near = float(((pairs.switch_layer - pairs[col]).abs() <= 2).mean())
        lines.append(f"{lens:>6} lens reads the source's labels ahead from layer {m2:.1f} [{lo2:.1f}, {hi2:.1f}]; "
                     f"switch minus lens: {d:+.1f} [{dlo:+.1f}, {dhi:+.1f}] layers; within 2 layers for {near:.0%}")
    return lines


def run(ctx) -> ViewResult:
    cfg = ctx.cfg
    tasks = read_tasks(cfg.tasks, ctx.tokenizer, cfg.first_token)
    result = patching_view(*ctx.parts, tasks, cfg.num_pairs, cfg.positions, **ctx.sampling)
    n = len(tasks) * (len(tasks) - 1)
    result.usage.append(Usage("prompt pairs", cfg.num_pairs * n, sum(len(s.prompts) * len(t.prompts) for s in tasks
                                                                     for t in tasks if s is not t),
                              cfg.num_pairs * n, f"tasks {cfg.tasks} ({', '.join(str(len(t.prompts)) for t in tasks)} "
                              "prompts)", [f"{cfg.num_pairs} pairs drawn with replacement per ordered pair of tasks"]))
    return result


plot = table_plot("plot_patching", "layers", "lens", "pairs")
