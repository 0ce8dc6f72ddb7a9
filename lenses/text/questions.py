"""Multiple-choice questions in MMLU's CSV layout (question, A, B, C, D, answer; a header row optional),
and the prompt format the mcq and patching views read them in."""

from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path

from lenses.base.errors import DataError
from lenses.text.data import read_utf8

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers).\n\n"


def default_mcq_path() -> Path:
    return Path(str(resources.files("lenses") / "datasets" / "mcq.csv"))


def read_mcq(path: str | Path | None = None) -> list[dict]:
    """Rows of an MMLU-layout CSV as ``{question, options: [4], answer: 'A'..'D'}`` (a header row
    ``question,A,B,C,D,answer`` is skipped if present)."""
    path = Path(path) if path else default_mcq_path()
    if not path.is_file():
        raise DataError(f"MCQ file {path} does not exist; pass an MMLU-layout CSV with --mcq.")
    try:
        rows = list(csv.reader(io.StringIO(read_utf8(path), newline="")))
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file ({e}); expected rows question,A,B,C,D,answer.") from e
    if rows and [c.strip().lower() for c in rows[0]] == ["question", "a", "b", "c", "d", "answer"]:
        rows = rows[1:]
    items = []
    for n, row in enumerate(rows, 1):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 6 or not all(c.strip() for c in row[:5]):
            raise DataError(f"{path}: row {n} has {len(row)} fields or an empty option; each row must be "
                            "question,A,B,C,D,answer with all four options filled.")
        answer = row[5].strip().upper()
        if answer not in LETTERS:
            raise DataError(f"{path}: row {n} gives the answer {row[5]!r}, which is not one of the options A, B, C, D.")
        items.append({"question": row[0].strip(), "options": [c.strip() for c in row[1:5]], "answer": answer})
    if not items:
        raise DataError(f"{path} holds no questions; pass an MMLU-layout CSV with --mcq.")
    return items


def format_question(q: dict, solved: bool) -> str:
    lines = [f"Question: {q['question']}"] + [f"{l}. {o}" for l, o in zip(LETTERS, q["options"])]
    return "\n".join(lines) + ("\nAnswer: " + q["answer"] + "\n\n" if solved else "\nAnswer:")
