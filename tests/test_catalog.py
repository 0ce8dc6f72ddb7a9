"""The catalog of published lenses: every entry is a loadable id, filters work, the CLI agrees."""

import json

import pytest

from lenses import LensesError
from lenses.__main__ import main
from lenses.kinds import catalog, hub
from lenses.kinds.sources import available, resolve_lens_path


def test_every_entry_parses_as_a_lens_id():
    entries = catalog.entries()
    kinds = {k: sum(e.kind == k for e in entries) for k in catalog.KINDS}
    assert kinds["tuned"] >= len(catalog.TUNED_LENS_MODELS) and kinds["jacobian"] >= len(hub.JACOBIAN_LENSES)
    ids = [e.lens_id for e in entries]
    assert len(set(ids)) == len(ids)
    for e in entries:
        assert e.kind in catalog.KINDS
        if e.repo == "lenses":
            assert resolve_lens_path(e.lens_id).exists()
            continue
        assert hub.is_hub_id(e.lens_id), e.lens_id
        repo, revision, name = hub.parse(e.lens_id)
        assert repo == e.repo and revision is None and name
        owner, _, rest = repo.partition("/")
        assert owner and rest and " " not in repo
        if e.kind == "jacobian":
            assert hub.jacobian_file(name) == e.subfolder  # the file the loader would fetch


def test_filters_and_shipped_lenses():
    smol = catalog.find("SmolLM2")
    assert {e.lens_id for e in smol} == {n for n in available() if n.startswith("smollm2")}
    assert {e.kind for e in catalog.find("gemma-3-270m", "jacobian")} == {"jacobian"}
    assert all("pythia" in e.model for e in catalog.find("pythia"))
    assert catalog.find("no-such-model") == []
    gemma_shipped = [e for e in catalog.find("google/gemma-3-270m") if e.repo == "lenses"]
    assert {e.lens_id for e in gemma_shipped} == {n for n in available() if n.startswith("gemma-3-270m")}
    with pytest.raises(LensesError, match="--kind"):
        catalog.find(kind="linear")


def test_cli_json_is_valid_and_filtered(capsys):
    assert main(["catalog", "--model", "pythia", "--kind", "tuned", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["kind"] == "tuned" and "pythia" in r["model"] for r in rows)
    assert {r["lens_id"] for r in rows} == {e.lens_id for e in catalog.find("pythia", "tuned")}
    with pytest.raises(SystemExit) as stop:
        main(["catalog", "--kind", "nonsense"])
    assert stop.value.code == 2
