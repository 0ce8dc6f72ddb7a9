"""The settings of the analysis (``analyze.py`` / ``lenses analyze``): each is a field and a CLI option, declared
once here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lenses.base.options import ParallelOptions, ResumeOptions, option
from lenses.model.loading import ModelOptions
from lenses.text.chat import MAX_GENERATE
from lenses.text.corpora import CorpusOptions


def _suffix(path: str, allowed: tuple[str, ...]) -> str | None:
    """A check of an output file's name: its suffix says what is written (and no input is overwritten by mistake)."""
    if Path(path).suffix.lower() not in allowed:
        return f"should end in {' or '.join(allowed)} (got {path!r})"
    if Path(path).is_dir():
        return f"is a folder ({path!r}); give a file name"
    return None


@dataclass
class AnalysisConfig(ModelOptions, ResumeOptions, CorpusOptions, ParallelOptions):
    """Settings of ``analyze.py`` (and of `run_views`); each is also a CLI option."""

    lens: str = option("auto", "auto | logit | both | tuned | jacobian | a lens folder, J-lens .pt file, shipped "
                       "name or hub id, optionally labelled (jlens:runs/jlens); comma-separate several", group="lens")
    strict: bool = option(True, "refuse a lens whose model weights differ slightly from this model's", group="lens")
    states: str | None = option(None, "decode hidden states another engine captured (a safetensors file, nnsight's "
                                "saved dictionary as .pt, or a folder of them; format: docs/analysis.md) instead "
                                "of running the model: only its embeddings, final norm and unembedding are loaded",
                                group="lens", check=lambda v: None if Path(v).exists() else
                                f"{v!r} does not exist; give a safetensors or .pt file, or a folder of them")
    seed: int = option(0, "seed of every sample the views draw", min=0)
    batch_size: int | None = option(None, "texts per forward pass in the views (none: from the memory plan, at "
                                          "most 16; 1: one at a time)", min=1)
    save_every: float = option(60.0, "seconds between saves of the texts a view has finished (what --resume "
                               "continues from; 0: after every batch)", min=0)
    decode_dtype: str = option("auto", "dtype of the views' vocabulary matmuls: bfloat16/float16 re-score each row's "
                               "top tokens and targets in float32, so top-1 ids stay exact (auto: bfloat16 where "
                               "this device multiplies it natively, else float32)",
                               choices=("auto", "float32", "bfloat16", "float16"))
    prompt: str = option("The capital of France is", "text to decode layer by layer (without --view)",
                         group="prompt", check=lambda v: "is empty; give some text" if not v.strip() else None)
    all_positions: bool = option(False, "print every position of --prompt, not just the last", group="prompt")
    top_k: int = option(5, "top tokens kept per layer and position (table, page)", group="prompt", min=1)
    html: str | None = option(None, "also write the interactive layer-by-position page here (e.g. out/lens.html)",
                              group="prompt", check=lambda v: _suffix(v, (".html", ".htm")))
    png: str | None = option(None, "also draw the grid as a figure here (e.g. out/lens.png; .pdf, .svg too)",
                             group="prompt", check=lambda v: _suffix(v, (".png", ".pdf", ".svg")))
    color: str = option("top1_prob", "colour statistic of --png", group="prompt",
                        choices=("top1_prob", "entropy", "kl", "rank_next"))
    chat_template: str = option("auto", "facts, mcq and the grid: wrap each prompt in the tokenizer's chat template "
                                "(user turn; answers scored from the assistant's first token). auto: on for an "
                                "instruct/chat model whose tokenizer has a template", group="prompt",
                                choices=("auto", "on", "off"))
    system: str | None = option(None, "a system prompt for the chat template", group="prompt")
    generate: int | None = option(None, "grid: generate this many tokens after --prompt and trace them too (at "
                                  f"most {MAX_GENERATE} and the model's positions)", group="prompt", min=1,
                                  below=MAX_GENERATE + 1)
    sample: bool = option(False, "grid: sample the generated tokens (with --seed) instead of greedy", group="prompt")
    sublayers: bool = option(False, "grid: also the half layers l + 0.5 (after each block's attention, before its "
                             "MLP), read with layer l's reading", group="prompt")
    facts: str | None = option(None, "facts JSONL: {prompt, answer}, CounterFact or MQuAKE (none: shipped set)",
                               group="views")
    mcq: str | None = option(None, "MMLU-layout CSV: question,A,B,C,D,answer (none: shipped set)", group="views")
    frequencies: str | None = option(None, "token_frequencies.safetensors (none: counted on --corpus)",
                                     group="views")
    num_positions: int = option(1000, "frequency, early-exit and agreement: positions traced", group="views", min=1)
    freq_prompts: str = option("paragraphs", "frequency: one held-out paragraph per prompt cut at a random word "
                               "(the paper), or positions of held-out blocks", group="views",
                               choices=("paragraphs", "blocks"))
    num_texts: int = option(200, "pos: paragraphs tagged", group="views", min=1)
    num_facts: int | None = option(None, "facts: sample this many (none: all)", group="views", min=1)
    num_questions: int = option(100, "mcq: questions scored", group="views", min=1)
    num_prompts: int = option(200, "representation: prompts", group="views", min=2)
    prompt_tokens: int = option(64, "representation: tokens per prompt", group="views", min=2)
    alpha: float = option(1.0, "representation: Renyi order (1 = von Neumann)", group="views", above=0)
    drop_first_token: bool = option(False, "representation: leave out position 0 (attention-sink token)",
                                    group="views")
    hist_layer: int | None = option(None, "representation: layer of the entropy histogram (none: the middle)",
                                    group="views", min=0)
    tasks: str = option("sentiment,yesno,continent,mcq", "patching: label-set tasks, shipped names or JSONL files "
                        "{prompt, labels, answer}, comma-separated", group="causal")
    num_pairs: int = option(10, "patching: prompt pairs per ordered pair of tasks", group="causal", min=1)
    positions: str = option("last", "patching: patch the last position, or all (prompts of equal length)",
                            group="causal", choices=("last", "all"))
    first_token: bool = option(False, "patching: let a multi-token label stand for its first token", group="causal")
    skip_positions: int = option(128, "layer-skip: positions scored", group="causal", min=1)
    act_layers: int = option(8, "interventions, fidelity: evenly spaced layers acted on (the last included)",
                             group="acting", min=1)
    act_positions: int = option(192, "interventions, fidelity: text positions edited and scored", group="acting",
                                min=2)
    steer_alpha: float = option(0.5, "interventions: the steering step, a fraction of the state's norm",
                                group="acting")
    steer_token: str | None = option(None, "interventions: steer every position toward this one token (e.g. ' Paris') "
                                     "instead of each position's runner-up", group="acting")
    fidelity_k: int = option(2, "fidelity: directions of each lens's causal basis", group="acting", min=1)
    num_swaps: int = option(40, "fidelity: facts answered right used by the causal swap", group="acting", min=1)
    swap_alpha: float = option(1.0, "fidelity: blend of the coordinate swap (1 = a full swap)", group="acting")
    items: str | None = option(None, "intermediates: JSONL of {prompt, answer, intermediates} (none: the shipped "
                               "two-hop set)", group="acting")
    num_items: int | None = option(None, "intermediates: sample this many items (none: all)", group="acting", min=1)
    skip_mode: str = option("zero", "layer-skip: the skipped block's update becomes zero, or its mean",
                            group="causal", choices=("zero", "mean"))

