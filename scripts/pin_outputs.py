"""Pin what the jobs compute on a tiny model, to compare two commits (a move of walls changes no number).

    python scripts/pin_outputs.py run OUT [--inputs DIR]   # train a tuned lens, fit a J-lens, the grid, every view
    python scripts/pin_outputs.py compare A B               # max difference of every table and tensor, file by file

``run`` calls the documented commands (``train_probes.py``, ``analyze.py``) in fresh processes, so it
reads nothing of the package's inner layout. ``--inputs`` reuses the tiny model folder of an earlier
run (the same weights and tokenizer on both sides). ``compare`` reads CSV tables (numbers: max absolute
difference; text: equal), safetensors / .pt tensors, and JSON (timings, dates and run ids left out);
it exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--seq-len", "32", "--batch-size", "2", "--max-tokens", "256", "--steps", "4", "--max-eval-tokens", "64"]
FIT = ["--num-prompts", "2", "--seq-len", "24", "--skip-first", "2", "--min-chars", "20", "--eval-tokens", "64",
       "--dim-batch", "8"]
POSITIONS = ["--num-positions", "16"]
VIEWS = {  # each view with the tiny counts of the settings it reads (an option a view does not read is refused)
    "frequency": POSITIONS, "pos": ["--num-texts", "3"], "facts": ["--num-facts", "2"], "mcq": ["--num-questions", "4"],
    "representation": ["--num-prompts", "3", "--prompt-tokens", "16"], "early-exit": POSITIONS,
    "patching": ["--num-pairs", "1"], "layer-skip": ["--skip-positions", "8"], "agreement": POSITIONS,
    "calibration": POSITIONS, "sublayer": POSITIONS}
VOLATILE = ("time", "second", "written", "date", "run_id", "host", "version", "python", "torch", "cpu", "elapsed",
            "started", "finished", "commit", "per_s")


def _call(script: str, *args: str) -> None:
    env = {**os.environ, "LENSES_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / script), *args, "--no-progress"], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def run(out: Path, inputs: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if inputs is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_inputs

        inputs = tiny_inputs(out / "inputs", letters=True)
        for name, labels in (("task_ab", [" A", " B"]), ("task_cd", [" C", " D"])):  # single tokens here
            rows = [json.dumps({"prompt": f"Item {i} of {name}: pick one:", "labels": labels, "answer": labels[i % 2]})
                    for i in range(4)]
            (inputs / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    elif inputs.resolve() != (out / "inputs").resolve():
        shutil.copytree(inputs, out / "inputs")
    model, corpus = str(out / "inputs" / "model"), str(out / "inputs" / "corpus.txt")
    common = ["--model", model, "--corpus", corpus]
    _call("train_probes.py", "--out", str(out / "tuned"), *common, *TRAIN)
    _call("train_probes.py", "--method", "jacobian", "--out", str(out / "jlens"), *common, *FIT)
    lenses = f"logit,tuned:{out / 'tuned'},jacobian:{out / 'jlens'}"
    _call("analyze.py", "--prompt", "The quick brown fox jumps over", "--model", model, "--lens", lenses,
          "--out", str(out / "grid"))
    for view, counts in VIEWS.items():
        tasks = f"{out}/inputs/task_ab.jsonl,{out}/inputs/task_cd.jsonl"
        reads = {"patching": ["--tasks", tasks], "facts": [], "mcq": []}.get(view, ["--corpus", corpus])
        _call("analyze.py", "--view", view, "--out", f"{out}/views/{view}", "--lens", lenses, "--model", model, *reads,
              *counts)
        print(f"pinned {view}", flush=True)


def _tables(a: Path, b: Path) -> float:
    x, y = pd.read_csv(a), pd.read_csv(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return float("inf")
    worst = 0.0
    for col in x.columns:
        if any(word in col.lower() for word in VOLATILE[:3]):
            continue
        if pd.api.types.is_numeric_dtype(x[col]) and pd.api.types.is_numeric_dtype(y[col]):
            u, v = x[col].to_numpy(float), y[col].to_numpy(float)
            if not np.array_equal(np.isnan(u), np.isnan(v)) or not np.array_equal(np.isinf(u), np.isinf(v)):
                return float("inf")
            both = np.isfinite(u)
            worst = max(worst, float(np.abs(u[both] - v[both]).max(initial=0.0)))
        elif not x[col].astype(str).equals(y[col].astype(str)):
            return float("inf")
    return worst


def _tensors(a: Path, b: Path) -> float:
    def load(p):
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(p)
        return torch.load(p, map_location="cpu", weights_only=False)

    def flat(obj, key=""):
        if isinstance(obj, torch.Tensor):
            yield key, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from flat(v, f"{key}/{i}")

    x, y = dict(flat(load(a))), dict(flat(load(b)))
    if x.keys() != y.keys():
        return float("inf")
    return max((float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x
                if x[k].shape == y[k].shape), default=0.0) if all(x[k].shape == y[k].shape for k in x) else float("inf")


def _json(a: Path, b: Path, roots: tuple[Path, Path]) -> float:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(w in k.lower() for w in VOLATILE)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    def read(p: Path, root: Path):  # the folders' own paths are not results
        return strip(json.loads(p.read_text().replace(str(root), "<OUT>")))

    return 0.0 if read(a, roots[0]) == read(b, roots[1]) else float("inf")


READERS = {".csv": _tables, ".safetensors": _tensors, ".pt": _tensors, ".json": _json}


def compare(a: Path, b: Path) -> int:
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.suffix in READERS and "inputs" not in p.parts}
                   | {p.relative_to(b) for p in b.rglob("*") if p.suffix in READERS and "inputs" not in p.parts})
    bad = 0
    for name in names:
        if not (a / name).exists() or not (b / name).exists():
            print(f"{name}: only in {'B' if not (a / name).exists() else 'A'}")
            bad += 1
            continue
        extra = ((a, b),) if name.suffix == ".json" else ()
        diff = READERS[name.suffix](a / name, b / name, *extra)
        bad += diff != 0
        print(f"{name}: max difference {diff:g}")
    print(f"{len(names)} files compared, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--inputs", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.verb == "run":
        run(args.out, args.inputs)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
