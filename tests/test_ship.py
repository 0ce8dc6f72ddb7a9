"""scripts/ship_lens.py keeps what was added to a lens card after shipping when it re-ships the lens."""

from __future__ import annotations

from pathlib import Path

from tiny_models import load_script

ROOT = Path(__file__).parent.parent


def _script():
    return load_script("ship_lens")


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
