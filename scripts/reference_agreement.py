"""Measure how closely lenses.causal agrees with the reference libraries, on the inputs the tests use, and write
``docs/data/reference-agreement.csv`` (rendered in docs/acting.md by ``scripts/doc_tables.py``).

    python scripts/reference_agreement.py

Rows: TransformerLens 4.3 (sparse decomposition, both algorithms; coordinate patch, both modes) on random
dictionaries; tuned-lens 0.2 (causal basis, principal angles; energies) on a tiny Llama; nnterp 1.3
(Patchscopes, probabilities at every layer) on a tiny Llama with a byte tokenizer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_acting_references import ALGORITHMS, _problem, causal_basis_case  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

from lenses import ModelAdapter  # noqa: E402
from lenses.causal import decompose, patch_coordinate  # noqa: E402
from lenses.causal.fidelity import principal_angles  # noqa: E402
from lenses.causal.patchscope import IDENTITY_PROMPT, patchscope_grid  # noqa: E402


def transformer_lens_rows() -> list[dict]:
    from transformer_lens.tools.analysis.jacobian_lens_coordinate_patch import solve_coordinate_patch
    from transformer_lens.tools.analysis.jacobian_lens_decomposition import get_sparse_decomposition

    rows = []
    for ours_name, theirs_name in ALGORITHMS.items():
        worst, same = 0.0, True
        for seed in range(8):
            x, D = _problem(seed)
            a, b = decompose(x, D, 10, ours_name), get_sparse_decomposition(x.float(), D.float(), 10,
                                                                            algorithm=theirs_name)
            same &= a.support.tolist() == b.support.tolist()
            worst = max(worst, float((a.coordinates - b.coordinates.double()).abs().max()))
        rows.append({"reference": "TransformerLens 4.3 get_sparse_decomposition", "case": f"{ours_name}, 8 problems",
                     "quantity": "coordinates (same support)" if same else "SUPPORT DIFFERS", "max_difference": worst})
    for mode in ("swap", "substitute"):
        x, D = _problem(7)
        source = int(decompose(x, D, 10).support[0])
        a = patch_coordinate(x, D, source, 250, mode, 0.6, k=10)
        b = solve_coordinate_patch(x.float(), D.float(), source, 250, k=10, mode=mode, alpha=0.6)
        worst = float((a.patched - b.patched.double()).abs().max())
        rows.append({"reference": "TransformerLens 4.3 solve_coordinate_patch", "case": f"{mode}, alpha 0.6",
                     "quantity": "patched state", "max_difference": worst})
    return rows


def tuned_lens_rows() -> list[dict]:
    angle = energy = 0.0
    for _, _, ref, mine, _, hs in causal_basis_case():
        angle = max(angle, float(principal_angles(mine.vectors, ref.vectors).max()))
        energy = max(energy, float((mine.energies - ref.energies).abs().max()))
    case = f"tiny Llama, {len(hs) - 1} layers, k = 2, mean ablation"
    return [{"reference": "tuned-lens 0.2 extract_causal_bases", "case": case, "quantity": "principal angle (rad)",
             "max_difference": angle},
            {"reference": "tuned-lens 0.2 extract_causal_bases", "case": case, "quantity": "energy (nats)",
             "max_difference": energy}]


def nnterp_rows() -> list[dict]:
    from nnterp import StandardizedTransformer
    from nnterp.interventions import TargetPrompt, patchscope_lens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama")
    nt = StandardizedTransformer(str(path), device_map="cpu", dtype=torch.float32)
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(path).eval())
    tokenizer = AutoTokenizer.from_pretrained(path)
    worst = 0.0
    for source in ("hello world", "The capital of France is"):
        theirs = patchscope_lens(nt, source, TargetPrompt(IDENTITY_PROMPT, -1))[0]
        worst = max(worst, float((patchscope_grid(adapter, tokenizer, source)[1:] - theirs).abs().max()))
    return [{"reference": "nnterp 1.3 patchscope_lens", "case": "tiny Llama, 2 prompts, every layer",
             "quantity": "probabilities", "max_difference": worst}]


def main() -> None:
    rows = transformer_lens_rows() + tuned_lens_rows() + nnterp_rows()
    out = ROOT / "docs" / "data" / "reference-agreement.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
