"""scripts/ship_lens.py keeps what was added to a lens card after shipping when it re-ships the lens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("ship_lens", ROOT / "scripts" / "ship_lens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_part_after_the_mark_is_kept(tmp_path):
    ship = _script()
    card = tmp_path / "README.md"
    assert ship.kept_part(card) == ""  # no card yet
    card.write_text("# generated\n\n| table |\n")
    assert ship.kept_part(card) == ""  # nothing was added
    card.write_text(f"# generated\n\n{ship.KEEP_MARK}\n\nCross-domain table\n")
    assert ship.kept_part(card) == f"\n{ship.KEEP_MARK}\n\nCross-domain table\n"


def test_the_shipped_card_marks_its_cross_domain_table():
    ship = _script()
    text = (ROOT / "lenses" / "pretrained" / "smollm2-135m-instruct" / "README.md").read_text()
    assert "Cross-domain" in ship.kept_part(ROOT / "lenses" / "pretrained" / "smollm2-135m-instruct" / "README.md")
    assert text.index(ship.KEEP_MARK) < text.index("Cross-domain")
