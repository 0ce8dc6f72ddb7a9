"""The one table of views: each row names a view, its module (``run(ctx) -> ViewResult`` and
``plot(result, path)``), the settings it reads and the group it belongs to. ``analyze.py --help``, the
refusal of an option a view does not read, the record of what a result depends on (``report.json``) and the
report page are derived from it; a new view is one module plus one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lenses.analysis import (
    agreement,
    calibration,
    early_exit,
    facts,
    fidelity,
    frequency,
    intermediates,
    interventions,
    layer_skip,
    mcq,
    patching,
    patchscope,
    pos,
    representation,
    sublayer,
)
from lenses.analysis.common import ViewResult
from lenses.analysis.config import AnalysisConfig
from lenses.analysis.context import Context
from lenses.base.errors import LensesError
from lenses.base.io import write_csv
from lenses.pages.plots import plot_message


@dataclass(frozen=True)
class View:
    name: str
    module: ModuleType | None  # None: the grid of --prompt (`lenses.commands.analyze.decode_prompt`)
    settings: tuple[str, ...]  # what its result depends on besides `MODEL_SETTINGS` (each an AnalysisConfig field)
    group: str = ""  # "depth": `--view all`; "causal": `--view causal`
    about: str = ""  # one line for --help and the report page
    draws: tuple[str, ...] = ()  # settings it reads that only draw or print its result (not recorded)


VIEWS = {v.name: v for v in (
    View("grid", None, ("prompt", "top_k", "chat_template", "system", "generate", "sample", "sublayers"),
         about="every layer and position of --prompt, decoded by each lens",
         draws=("html", "png", "color", "all_positions")),
    View("frequency", frequency, ("corpus", "num_positions", "freq_prompts", "frequencies"), "depth",
         "depth of the final guess by token frequency"),
    View("pos", pos, ("corpus", "num_texts"), "depth", "depth of the final guess by part of speech"),
    View("facts", facts, ("facts", "num_facts", "chat_template", "system"), "depth",
         "at what depth a fact's answer appears"),
    View("mcq", mcq, ("mcq", "num_questions", "chat_template", "system"), "depth",
         "when the answer letter is found, then chosen"),
    View("representation", representation,
         ("corpus", "num_prompts", "prompt_tokens", "alpha", "drop_first_token", "hist_layer"), "",
         "representation quality per layer (Skean et al. 2024)"),
    View("early-exit", early_exit, ("corpus", "num_positions"), "causal",
         "stop at layer l and emit the lens's prediction"),
    View("patching", patching, ("tasks", "num_pairs", "positions", "first_token"), "causal",
         "cross-task patching: the switch layer vs the lens's reading"),
    View("layer-skip", layer_skip, ("corpus", "skip_positions", "skip_mode"), "causal",
         "skip block l: its effect on every later readout"),
    View("interventions", interventions, ("corpus", "act_positions", "act_layers", "steer_alpha", "steer_token"),
         "acting",
         "ablate and steer along lens directions, against random directions"),
    View("fidelity", fidelity, ("corpus", "act_positions", "act_layers", "fidelity_k", "facts", "num_swaps",
                                "swap_alpha", "chat_template", "system"), "acting",
         "causal fidelity per lens and layer, and the causal swap benchmark"),
    View("intermediates", intermediates, ("items", "num_items", "chat_template", "system"), "acting",
         "whether a lens reads a two-hop prompt's intermediate concept"),
    View("patchscope", patchscope, ("prompt", "top_k", "chat_template", "system"), "",
         "--prompt read through the identity prompt at every layer (Patchscopes)"),
    View("agreement", agreement, ("corpus", "num_positions"), "", "how alike the lenses read, layer by layer"),
    View("calibration", calibration, ("corpus", "num_positions"), "",
         "whether a lens's probabilities can be read at face value"),
    View("sublayer", sublayer, ("corpus", "num_positions", "frequencies"), "",
         "attention or MLP: which half of a block refines the guess"),
)}
VIEW_NAMES = tuple(name for name in VIEWS if name != "grid")
DEPTH_VIEWS = tuple(v.name for v in VIEWS.values() if v.group == "depth")  # all: Gupta et al. 2025's four
CAUSAL_VIEWS = tuple(v.name for v in VIEWS.values() if v.group == "causal")  # causal: what the lenses show, tested
ACTING_VIEWS = tuple(v.name for v in VIEWS.values() if v.group == "acting")  # acting: tests of what a lens reads
VIEW_SETTINGS = {name: v.settings for name, v in VIEWS.items()}
SELECTIONS = {"all": DEPTH_VIEWS, "causal": CAUSAL_VIEWS, "acting": ACTING_VIEWS}  # --view names for several views
MODEL_SETTINGS = ("model", "model_dtype", "quantize", "decode_dtype", "layers", "final_norm", "unembed", "lens",
                  "strict", "seed", "states")  # settings every view's result depends on: a page holds one of each


STATES_VIEWS = ("grid", "frequency", "pos", "facts", "mcq", "calibration", "early-exit")  # those that only trace


def selected(view: str | None) -> list[str]:
    """The views ``--view`` names (none: the grid)."""
    return ["grid"] if view is None else list(SELECTIONS.get(view, (view,)))


def view_settings(cfg: AnalysisConfig, name: str) -> dict:
    """The settings view ``name``'s result depends on, as recorded in ``report.json``."""
    return {k: getattr(cfg, k) for k in MODEL_SETTINGS + VIEWS[name].settings}


def unread(cfg: AnalysisConfig, names: list[str]) -> list[tuple[str, str]]:
    """``(option, the views that read it)`` for every view setting given (not at its default) that none of the
    views ``names`` reads."""
    default = AnalysisConfig()
    read = {k for n in names for k in VIEWS[n].settings + VIEWS[n].draws}
    return [(key, ", ".join(v.name for v in VIEWS.values() if key in v.settings + v.draws))
            for key in dict.fromkeys(k for v in VIEWS.values() for k in v.settings + v.draws)
            if key not in read and getattr(cfg, key) != getattr(default, key)]


def get_view(name: str) -> ModuleType:
    """The module of view ``name`` (with ``run`` and ``plot``)."""
    if name not in VIEW_NAMES:
        raise LensesError(f"unknown view {name!r}; choose one of {', '.join(VIEW_NAMES)}, all, causal or acting.")
    return VIEWS[name].module


def run_view(name: str, ctx: Context) -> ViewResult:
    return get_view(name).run(ctx)


def write_view(result: ViewResult, out: str | Path) -> list[Path]:
    """Write every table of ``result`` as CSV and the view's figure as ``<view>.png`` into ``out``."""
    out = Path(out)
    written = [write_csv(out / f"{result.view}_{name}.csv", table) for name, table in result.tables.items()]
    if result.settings.get("empty"):
        written.append(plot_message(result.settings["empty"], out / f"{result.view}.png"))
    else:
        written.append(get_view(result.view).plot(result, out / f"{result.view}.png"))
    return written
