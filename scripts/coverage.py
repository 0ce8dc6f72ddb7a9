#!/usr/bin/env python
"""Coverage sweep: every model type in transformers' causal-LM mapping, as a tiny random model.

For each type: build the config class with shrunk sizes (layers, width, heads, experts, vocabulary;
the architecture's own switches are left as they are), build the model, and run our checks:
the adapter finds its parts and decoding the last hidden state reproduces the model's logits
(`ModelAdapter.from_model` verifies it), the hidden states agree with ``output_hidden_states``
where the model returns them, an untrained tuned lens equals the logit lens, and `trace` runs.
Each type ends as ``pass``, ``refused`` (with a reason: not decoder-only, a config we cannot
build, ...) or ``fail`` (with the error: a bug for us to fix).

    .venv/bin/python scripts/coverage.py                 # all types -> docs/coverage.md
    .venv/bin/python scripts/coverage.py llama mixtral    # some types, printed only

This first version is the "before" picture of the coverage issue: its table is generated, never
hand-written; adapter fixes come next.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("LENSES_COMPILE", "0")  # each forked check would compile the kernels again

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHRINK = {  # config field -> tiny value, set when the config has the field
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "kv_channels": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 128, "max_position_embeddings": 128, "n_positions": 128,
}
ENCODER_DECODER = {"bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart", "prophetnet",
                   "xlm-prophetnet", "bigbird_pegasus", "trocr", "whisper", "speech_to_text_2", "m2m_100"}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = getattr(config, "text_config", None) or config
    for cfg in {id(c): c for c in (config, text)}.values():
        for key, value in SHRINK.items():
            if isinstance(getattr(cfg, key, None), int) and not isinstance(getattr(cfg, key), bool):
                setattr(cfg, key, value)
        if isinstance(getattr(cfg, "layer_types", None), list):
            try:
                cfg.layer_types = cfg.layer_types[: getattr(cfg, "num_hidden_layers", 2)]
            except AttributeError:  # derived from other fields in this config
                pass
    return config


def check(model_type: str, class_name: str) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM

    from lenses import LogitLens, TunedLens
    from lenses.errors import ModelStructureError
    from lenses.models import ModelAdapter
    from lenses.trace import TraceItem, trace

    if model_type in ENCODER_DECODER:
        return "refused", "encoder-decoder model: its causal-LM class is a decoder reading an encoder's states"
    try:
        torch.manual_seed(0)
        config = tiny_config(model_type)
        model = AutoModelForCausalLM.from_config(config).eval()
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        return "refused", f"cannot build a tiny model from the default config: {type(e).__name__}: {str(e)[:160]}"
    try:
        adapter = ModelAdapter.from_model(model)
    except ModelStructureError as e:
        return "fail", f"adapter: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001
        return "fail", f"adapter: {type(e).__name__}: {str(e)[:200]}"
    try:
        vocab = min(adapter.vocab_size, 100)
        ids = torch.arange(1, 9)[None] % vocab + 1
        hidden = adapter.hidden_states(ids)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = getattr(out, "hidden_states", None)
        if hs is not None and len(hs) == adapter.num_layers + 1:
            for l in range(adapter.num_layers):
                if not torch.allclose(hs[l].float(), hidden[l].float(), atol=1e-4, rtol=1e-4):
                    return "fail", f"hidden state {l} differs from output_hidden_states"
        lens = TunedLens.for_model(adapter)
        logit = LogitLens(adapter)
        with torch.no_grad():
            for l in range(adapter.num_layers + 1):
                if not torch.allclose(lens(hidden[l], l), logit(hidden[l], l)):
                    return "fail", f"untrained tuned lens differs from the logit lens at layer {l}"
        trace(adapter, {"logit": logit}, [TraceItem(ids[0].tolist(), [3, 7], {"next": [1, 2]})])
    except Exception as e:  # noqa: BLE001
        return "fail", f"{type(e).__name__}: {str(e)[:200]}"
    return "pass", ""


TIMEOUT_S, MEMORY_GB = 90, 6


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_GB * 2**30, MEMORY_GB * 2**30))


def _check_safely(model_type: str) -> tuple[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return check(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?"))
    except MemoryError:
        return "fail", f"over {MEMORY_GB} GB (the tiny config may not be tiny)"
    except Exception as e:  # noqa: BLE001
        return "fail", f"{type(e).__name__}: {str(e)[:200]} {traceback.format_exc(limit=1)[-120:]}"


def run_isolated(model_type: str) -> tuple[str, str]:
    """`check` in a forked child (imports already done in the parent) with a time and memory limit, so a
    config that does not shrink cannot take the sweep down with it."""
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(1, initializer=_limit_memory, maxtasksperchild=1)
    try:
        return tuple(pool.apply_async(_check_safely, (model_type,)).get(TIMEOUT_S))
    except multiprocessing.TimeoutError:
        return "fail", f"no result within {TIMEOUT_S} s (the tiny config may not be tiny)"
    except Exception as e:  # noqa: BLE001 - the child died
        return "fail", f"the check process died ({type(e).__name__}: {str(e)[:120]})"
    finally:
        pool.terminate()


def main(argv: list[str]) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import lenses.trace  # noqa: F401 - imported once here, shared by the forked children
    from transformers import AutoModelForCausalLM  # noqa: F401

    types = argv or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows, start = [], time.time()
    for t in types:
        t0 = time.time()
        result, reason = run_isolated(t)
        rows.append((t, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t, "?"), result, reason.replace("|", "/")))
        print(f"{t:28s} {result:8s} {time.time() - t0:5.1f} s  {reason[:110]}", flush=True)
    counts = {k: sum(r[2] == k for r in rows) for k in ("pass", "refused", "fail")}
    summary = (f"{counts['pass']} of {len(rows)} causal-LM types pass; {counts['refused']} refused, "
               f"{counts['fail']} fail (transformers {transformers.__version__}, {time.time() - start:.0f} s)")
    print(summary)
    if not argv:
        from lenses.io import write_text

        lines = ["# Coverage: every causal-LM type in transformers", "",
                 "Generated by `scripts/coverage.py`; do not edit by hand.", "", summary, "",
                 "Work in progress (issue: every causal LM): the sweep shrinks configs generically, so some "
                 "**fail** rows are shapes the shrinking made inconsistent (rotary or head sizes, MLA and "
                 "state-space dimensions) rather than adapter bugs, and encoder-only models are not yet "
                 "refused by name.", "",
                 "| type | class | transformers | result | reason |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {c} | {transformers.__version__} | {r} | {why} |" for t, c, r, why in rows]
        write_text(ROOT / "docs" / "coverage.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
