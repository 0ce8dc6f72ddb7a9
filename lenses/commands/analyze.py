"""Look inside a model layer by layer.

    python analyze.py --view all --out out/
        the four depth-analysis views of Gupta et al. 2025 ("Guess-then-Refine") with the logit
        lens and the tuned lens: frequency, pos, facts, mcq. Each writes <view>_*.csv tables and
        <view>.png into --out, prints a short summary, and writes --out/index.html, the page to open
        first (settings, summaries, figures, links to the tables). One view: --view facts (etc.).

    python analyze.py --prompt "The capital of France is" --out out/ [--html out/lens.html] [--png out/lens.png]
        decodes every layer and position of the prompt with each lens, prints the top-1 token per
        layer at the last position and writes out/lens_grid.csv (one row per lens, layer and
        position: top-k tokens and probabilities, entropy, KL to the final layer, rank of the true
        next token); --html writes the interactive grid page, --png the grid as a figure.

    python analyze.py --view representation --out out/ [--corpus prompts.txt] [--num-prompts 200]
        per-layer representation quality (Skean et al. 2024): representation_layers.csv,
        representation_prompts.csv and representation.png.

    python analyze.py --view causal --out out/
        causal checks of what the lenses show: early-exit (stop at layer l, emit the lens's
        prediction), patching (cross-task activation patching: the switch layer vs the lens's
        reading; --tasks, --num-pairs, --positions) and layer-skip (skip block l, measure every
        later readout and the output; --skip-mode zero|mean). One: --view patching (etc.).

    python analyze.py --view agreement --lens logit,tuned,jacobian:runs/jlens --out out/
        how alike the lenses are, layer by layer: top-1 agreement and symmetric KL of every pair.

--lens: 'auto' (default: the logit lens plus every lens shipped for this model: tuned, Jacobian),
'logit', 'both' (logit + shipped tuned lens), 'tuned' or 'jacobian' (the shipped lens of that
kind; an error if none is shipped), or lens folders, J-lens .pt files, shipped names or hub ids
(neuronpedia/jacobian-lens:gpt2-small), each optionally labelled (mine:runs/lens), comma-separated
(each shown next to the logit lens). --out must be new, empty, or the output folder of an earlier
analyze.py run.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import torch

from lenses.analysis import (
    MODEL_SETTINGS,
    VIEW_NAMES,
    VIEW_SETTINGS,
    VIEWS,
    AnalysisConfig,
    Context,
    run_view,
    selected,
    unread,
    view_settings,
    write_view,
)
from lenses.analysis.common import Usage
from lenses.analysis.table import SELECTIONS, STATES_VIEWS
from lenses.base import lifecycle
from lenses.base.errors import LensesError
from lenses.jobs import sharding
from lenses.jobs.distributed import DataParallel
from lenses.base.io import owner, run_id, write_csv
from lenses.base.options import Parser, add_options, from_args
from lenses.base.outdir import check_target, claim
from lenses.engine import DTYPES, compute_dtype, warm_up_in_background
from lenses.kinds.registry import select_lenses
from lenses.model.head import load_head
from lenses.model.loading import DEFAULT_MODEL
from lenses.pages.grid import lens_grid, plot_grid, visible
from lenses.pages.grid_page import write_grid_html
from lenses.pages.report import Report, ViewEntry, analysis_settings, earlier_views
from lenses.text import convention
from lenses.text.chat import chat_turn, generate
from lenses.tracing import parallel, saved, states
from lenses.tracing.captured import Captured

# A view setting given where no selected view reads it is a note; these are refused (they change what a person
# expects to see), each group with its own message.
REFUSED = {
    ("chat_template", "system"): "--chat-template and --system apply to the facts, mcq, fidelity, intermediates and "
                                 "patchscope views and the grid, not --view {view}; drop them or run one of those",
    ("generate", "sample", "sublayers"): "--generate, --sample and --sublayers extend the grid of --prompt; run them "
                                         "without --view",
    ("html", "png"): "--html and --png draw the grid of --prompt; run them without --view (views write "
                     "<out>/index.html and their own figures)",
}
GROUPS = {"model": "model", "lens": "lenses", "runtime": "running", "prompt": "prompt decoding (without --view)",
          "recipe": "views",
          "views": "views", "causal": "causal checks (early-exit, patching, layer-skip)",
          "acting": "testing what a lens reads (interventions, fidelity, intermediates)"}


def parse_args(argv=None, prog: str = "analyze.py") -> tuple[AnalysisConfig, str | None]:
    p = Parser(description=__doc__, prog=prog)
    p.add_argument("--view", choices=(*VIEW_NAMES, *SELECTIONS), default=None,
                   help="which view to run: " + "; ".join(f"{v.name}: {v.about}" for v in VIEWS.values() if v.module)
                   + "; " + "; ".join(f"{k} = {', '.join(names)}" for k, names in SELECTIONS.items())
                   + " (default: none, decode --prompt)")
    add_options(p, AnalysisConfig, GROUPS)
    a = p.parse_args(argv)
    cfg = from_args(AnalysisConfig, a)
    if cfg.sample and not cfg.generate:
        p.error("--sample draws the tokens of --generate; give --generate N too")
    missed = unread(cfg, selected(a.view))
    for options, message in REFUSED.items():
        if any(option in options for option, _ in missed):
            p.error(message.format(view=a.view))
    if cfg.states:
        other = [n for n in selected(a.view) if n not in STATES_VIEWS]
        if other or cfg.fsdp or cfg.generate or cfg.sublayers:
            p.error(f"--states decodes captured states without running the model, which {', '.join(other) or 'that'} "
                    f"needs; with --states run the grid (no --view) or {', '.join(STATES_VIEWS[1:])}, without "
                    "--fsdp, --generate and --sublayers")
    for option, readers in missed:
        here = f"--view {a.view}" if a.view else "the grid of --prompt (no --view)"
        readers = readers.replace("grid", "the grid of --prompt (no --view)")
        print(f"note: --{option.replace('_', '-')} is not read by {here}; it is read by {readers}; it has no effect "
              "here", file=sys.stderr)
    return cfg, a.view


def main(argv=None, prog: str = "analyze.py") -> int:
    """``analyze.py`` / ``lenses analyze``: parse ``argv`` and run the views or the grid. Under ``torchrun`` every
    process loads the model, the views that trace split their texts over the processes (`lenses.tracing.parallel`)
    and the first process writes the folder and the page; the others run the same views silently (`_follow`)."""
    cfg, view = parse_args(argv, prog)
    names = selected(view)
    if cfg.fsdp:
        sharding.check_launch(prog, cfg.quantize)
        if view is None:
            raise LensesError("--fsdp shards the model for the views, which read many texts; the grid of --prompt "
                              "reads one: run it without --fsdp (--device-map auto spreads a model that does not fit).")
    dp = DataParallel.from_env(cfg.device)
    if dp.device is not None:
        cfg.device = str(dp.device)
    if not dp.main:
        return _follow(cfg, view, dp.device)
    with claim(cfg.out, "analysis", resumable=False, owned=(saved.PART,)) as folder, \
            owner(run_id("analysis", cfg.out)):
        for option, path in (("--html", cfg.html), ("--png", cfg.png)):
            if path:
                check_target(path, cfg.overwrite, option)
        dropped = replaced_views(folder, cfg, names)  # before any model loads
        saver = _saver(folder.path, cfg)
        names = parallel.shared(_unfinished(folder.path, cfg, names))
        if view is not None:
            warm_up(cfg)
        model, tok, adapter = _load(cfg)
        lifecycle.check_stop()
        ctx = Context(adapter, tok, select_lenses(cfg.lens, adapter, strict=cfg.strict, tokenizer=tok), cfg)
        if cfg.fsdp:
            print(sharding.shard_for_reading(adapter, dp.device))
        captured = Captured.of(cfg.states, adapter) if cfg.states else None
        if captured:
            print("\n".join(captured.notes))
        report = Report(f"lenses analysis: {cfg.model or DEFAULT_MODEL}", analysis_settings(cfg, ctx.lenses, names),
                        pending=names, dropped=dropped)
        if view is None:
            with states.reading(captured):
                decode_prompt(ctx, report)
            folder.finish()
            return 0
        try:
            with saved.saving(saver), states.reading(captured):
                run_views(ctx, names, report)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the page says which views are missing, then one line
            report.interrupted = True
            report.write(cfg.out)
            raise
        folder.finish()
    return 0


def _load(cfg: AnalysisConfig):
    """``(model, tokenizer, adapter)``: the whole model, or with ``--states`` its head only (`lenses.model.head`)."""
    if cfg.states:
        return load_head(cfg)
    return cfg.load()


def _saver(folder: Path, cfg: AnalysisConfig) -> saved.Saver:
    """Where the views save the texts they finish (`lenses.tracing.saved`). Parts an interrupted run left are
    continued with ``--resume``, deleted with ``--overwrite``, and otherwise refuse the run (nothing is lost)."""
    saver = saved.Saver(folder, cfg.resume, cfg.save_every)
    pending = saver.pending()
    if pending and not cfg.resume:
        if not cfg.overwrite:
            raise LensesError(f"--out {folder} holds {pending} saved part(s) of a view an interrupted run did not "
                              "finish: pass --resume to continue from them (on any number of processes), "
                              "--overwrite to start afresh, or choose another --out.")
        saver.clear(everything=True)
    return saver


def _unfinished(folder: Path, cfg: AnalysisConfig, names: list[str]) -> list[str]:
    """The views to run: all of ``names``, but with ``--resume`` not those the folder holds finished with the
    same settings (they stay on the page as they are)."""
    if not cfg.resume:
        return names
    done = [v["name"] for v in earlier_views(folder) if v["name"] in names
            and not _settings_differ(v, view_settings(cfg, v["name"]))]
    if done:
        print(f"--resume: keeping the finished view(s) {', '.join(done)} (same settings)", file=sys.stderr)
    return [n for n in names if n not in done]


def _follow(cfg: AnalysisConfig, view: str | None, device: torch.device | None = None) -> int:
    """A process other than the first under ``torchrun``: the same views in the same order (so that every trace
    is split the same way), printing and writing nothing but the texts it finishes (`lenses.tracing.saved`)."""
    cfg.progress = False
    names = parallel.shared(None)  # the first process's list (`_unfinished`)
    with contextlib.redirect_stdout(io.StringIO()):
        model, tok, adapter = _load(cfg)
        ctx = Context(adapter, tok, select_lenses(cfg.lens, adapter, strict=cfg.strict, tokenizer=tok), cfg)
        if cfg.fsdp:
            print(sharding.shard_for_reading(adapter, device), file=sys.stderr)
        captured = Captured.of(cfg.states, adapter) if cfg.states else None
        with saved.saving(saved.Saver(Path(cfg.out), cfg.resume, cfg.save_every)), states.reading(captured):
            for name in names if view is not None else []:
                lifecycle.check_stop()
                run_view(name, ctx)
    return 0


def warm_up(cfg: AnalysisConfig) -> None:
    """Compile the tracing kernels in the background while the model loads (`engine.warm_up_in_background`),
    for the device the model will be on (a model spread by ``--device-map`` compiles them on first use)."""
    if cfg.device_map is None:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        warm_up_in_background(compute_dtype(cfg.decode_dtype, device), device, DTYPES[cfg.model_dtype])


def run_views(ctx: Context, names: list[str], report: Report) -> None:
    """Run each view, write its tables and figure, and rewrite the page after each one."""
    cfg = ctx.cfg
    for name in names:
        lifecycle.check_stop()
        start = time.time()
        result = run_view(name, ctx)
        written = write_view(result, cfg.out)
        report.views.append(ViewEntry(name, result.lines(), written, time.time() - start,
                                      settings=view_settings(cfg, name), data=[u.record() for u in result.usage]))
        index = report.write(cfg.out)  # after every view: an interrupted run still has its page
        if saved.current():  # the view's saved texts: its tables hold them now
            saved.current().clear()
        print(f"\n== {name} ({time.time() - start:.0f} s)")
        print("\n".join(result.lines()))
        print("wrote " + ", ".join(map(str, written)))
    if not names:
        index = Path(cfg.out) / "index.html"
    print(f"\nopen {index} first: the settings, every view's summary, figure and tables")


def replaced_views(folder, cfg, names: list[str]) -> set[str]:
    """The earlier views of ``--out`` this run replaces; checked before any model loads. A view this run redoes
    with other settings is refused unless ``--overwrite``, which deletes that view's files only. A view it
    does not redo stays on the page, untouched; if it was made with other model settings (the page would mix
    two models), the run is refused, with or without ``--overwrite``, so that nothing is lost."""
    redo, keep = {}, {}
    for v in earlier_views(folder.path):
        name = v["name"]
        keys = view_settings(cfg, name) if name in names else {k: getattr(cfg, k) for k in MODEL_SETTINGS}
        unrecorded = [k for k in keys if k not in (v.get("settings") or {})]
        if name not in names and v.get("settings") and unrecorded:  # kept as it is, and said
            print(f"note: the {name} view in {folder.path} was made by an earlier lenses that did not record "
                  f"{', '.join(unrecorded)}; it stays on the page as it is.", file=sys.stderr)
            keys = {k: keys[k] for k in keys if k not in unrecorded}
        why = _settings_differ(v, keys)
        if why:
            (redo if name in names else keep)[name] = (why, v)
    if keep:
        what = " | ".join(f"{n} ({why})" for n, (why, _) in keep.items())
        raise LensesError(f"--out {folder.path} holds views this run does not redo, made with other model settings: "
                          f"{what}. Choose another --out (a page never mixes two models; nothing was changed).")
    if redo and not cfg.overwrite:
        what = " | ".join(f"{n} ({why})" for n, (why, _) in redo.items())
        raise LensesError(f"--out {folder.path} holds views made with other settings: {what}. Pass --overwrite to "
                          "replace them (only these views), or choose another --out (a page never mixes two runs).")
    for _, v in redo.values():
        folder.forget(v["files"])
    return set(redo)


def _settings_differ(view: dict, mine: dict) -> str:
    """Why an earlier ``view`` (its record in report.json) differs from settings ``mine`` ('' if it does not)."""
    if view["name"] not in VIEW_SETTINGS or not view.get("settings"):
        return "made by an earlier version of lenses (settings not recorded)"
    there, default = view["settings"], AnalysisConfig()
    # a setting an earlier version did not record had its default then (e.g. --states): the same if it has it now
    changed = [f"{k}: {there[k]!r} there, {mine[k]!r} now" if k in there else f"{k} not recorded there"
               for k in mine if (k not in there and mine[k] != getattr(default, k, None))
               or (k in there and there[k] != mine[k])]
    return "; ".join(changed[:3])


def decode_prompt(ctx: Context, report: Report) -> int:
    cfg = ctx.cfg
    start = time.time()
    chat, why = ctx.chat
    if chat:
        turn = chat_turn(ctx.tokenizer, cfg.prompt, cfg.system)
        ids, roles = turn.ids, turn.roles
    else:
        ids = convention.encode(ctx.tokenizer, cfg.prompt)  # as in use: the tokenizer's BOS where it adds one
        first = convention.of(ctx.tokenizer).first
        roles = ["special"] * first + ["text"] * (len(ids) - first)
    at = len(ids) - 1  # the prompt's last position: what the model says next
    ids, roles, note = _captured_prompt(ids, roles)
    at = at if note == [] else len(ids) - 1
    said = []
    if cfg.generate:
        new = generate(ctx.adapter.model, ids, cfg.generate, cfg.sample, cfg.seed, ctx.tokenizer.eos_token_id,
                       progress=cfg.progress)
        ids, roles = ids + new, roles + ["generated"] * len(new)
        said = [f"generated {len(new)} token(s) ({'sampled, seed ' + str(cfg.seed) if cfg.sample else 'greedy'}): "
                f"{ctx.tokenizer.decode(new)!r}"]
    table = lens_grid(ctx.adapter, ctx.tokenizer, cfg.prompt, ctx.lenses, top_k=cfg.top_k, ids=ids, roles=roles,
                      sublayers=cfg.sublayers)
    last = table[table.position == at]
    last = last.assign(token_1=last.token_1.where(last.prob_1.notna(), None))  # None: the lens skips that layer
    wide = last.pivot(index="layer", columns="lens", values="token_1")
    lines = [why, *note, *said, f"top-1 prediction after {cfg.prompt!r}, by layer ('-': a layer the lens does not "
             "read):",
             wide.map(lambda t: "-" if t is None or t != t else repr(t)).to_string()]
    print("\n".join(lines))
    if cfg.all_positions:
        for name, rows in table.groupby("lens", sort=False):
            grid = rows.pivot(index="layer", columns="position", values="token_1").map(visible)
            grid.columns = [visible(t) for t in rows.drop_duplicates("position").input_token]
            print(f"\n{name} lens, every position (columns: input tokens):\n{grid.to_string()}")
    written = [write_csv(f"{cfg.out}/lens_grid.csv", table)]
    print(f"wrote {written[0]}")
    title = f"{cfg.model or DEFAULT_MODEL}: {cfg.prompt[:80]}"
    if cfg.html:
        written.append(write_grid_html(table, cfg.html, title, overwrite=cfg.overwrite))
        print(f"wrote {written[-1]} (open it in a browser)")
    if cfg.png:
        written.append(plot_grid(table, cfg.png, stat=cfg.color, overwrite=cfg.overwrite))
        print(f"wrote {written[-1]}")
    n = table.position.nunique()
    gen = int(table[table.lens == table.lens.iloc[0]].generated.sum())
    templated = ", with its chat template" if chat else ""
    lines.insert(0, f"data: {n} positions ({n - gen} of the prompt, all of it{templated}"
                    f"{f'; {gen} generated' if gen else ''}), {table.lens.nunique()} lenses")
    inside = [f for f in written if Path(f).resolve().is_relative_to(Path(cfg.out).resolve())]
    report.views.append(ViewEntry("grid", lines, inside, time.time() - start, settings=view_settings(cfg, "grid"),
                                  data=[Usage("positions", None, n, n, "--prompt").record()]))
    report.write(cfg.out)
    return 0



def _captured_prompt(ids: list[int], roles: list[str]) -> tuple[list[int], list[str], list[str]]:
    """With ``--states``: the captured sequence that starts with the prompt's tokens (all of it), else the first
    one captured, with a note; without: the prompt as it is."""
    captured = states.current()
    if captured is None:
        return ids, roles, []
    match = next((s for s in captured.sequences if s.ids[: len(ids)] == tuple(ids)), None)
    if match is not None:
        extra = len(match.ids) - len(ids)
        return list(match.ids), roles + ["text"] * extra, []
    first = captured.sequences[0]
    return list(first.ids), ["text"] * len(first.ids), [
        f"note: no captured sequence starts with --prompt's {len(ids)} tokens; the grid shows the first one captured "
        f"({len(first.ids)} tokens, {first.where})"]
