"""The table behind the layer-by-position grid, checked against float64 and the model's own logits;
the page and the figure drawn from the table alone (so from its CSV too)."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, random_lens, tiny_model

from lenses import LensesError, LogitLens
from lenses.base.io import write_csv
from lenses.model.adapter import ModelAdapter
from lenses.pages.grid import lens_grid, plot_grid, read_grid, visible
from lenses.pages.grid_page import grid_data, grid_html
from lenses.tracing.trace import TraceItem, trace

TEXT = "The cat sat\n\ton the <mat>."


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    adapter = ModelAdapter.from_model(model)
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter)}
    return model, adapter, byte_tokenizer(), lenses


def test_grid_matches_a_float64_reference_and_the_model(setup):
    model, adapter, tok, lenses = setup
    k = 4
    table = lens_grid(adapter, tok, TEXT, lenses, top_k=k)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    n, L = len(ids), adapter.num_layers
    assert len(table) == len(lenses) * (L + 1) * n
    with torch.no_grad():
        hidden = adapter.hidden_states(torch.tensor([ids]))[:, 0].double()  # [L+1, n, d]
        final = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    for name, lens in lenses.items():
        lens64 = copy.deepcopy(lens).double() if name == "tuned" else lens
        for layer in range(L + 1):
            with torch.no_grad():
                logp = torch.log_softmax(lens64(hidden[layer], layer, torch.float64).double(), -1)
            if layer == L:  # the last layer is the model itself
                torch.testing.assert_close(logp, final, atol=1e-4, rtol=0)
            rows = table[(table.lens == name) & (table.layer == layer)].sort_values("position")
            p = logp.exp().numpy()
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            assert (rows[[f"id_{r}" for r in range(1, k + 1)]].to_numpy() == order).all()
            np.testing.assert_allclose(rows[[f"prob_{r}" for r in range(1, k + 1)]].to_numpy(),
                                       np.take_along_axis(p, order, 1), rtol=1e-4)
            np.testing.assert_allclose(rows.entropy, -(p * logp.numpy()).sum(1), rtol=1e-4, atol=1e-5)
            kl = (final.exp() * (final - logp)).sum(1).numpy()
            np.testing.assert_allclose(rows.kl, kl, rtol=1e-3, atol=1e-5)
            nxt = np.array(ids[1:])
            rank = 1 + (p[:-1] > p[np.arange(n - 1), nxt][:, None]).sum(1)
            assert (rows.rank_next.to_numpy()[:-1] == rank).all() and np.isnan(rows.rank_next.iloc[-1])
            assert [visible(t) for t in rows.token_1] == [visible(tok.decode([i])) for i in order[:, 0]]


def test_grid_equals_trace_on_the_same_text(setup):
    _, adapter, tok, lenses = setup
    table = lens_grid(adapter, tok, TEXT, lenses, top_k=1)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    ref = trace(adapter, lenses, [TraceItem(ids, list(range(len(ids))), {"next": ids[1:] + [0]})])
    assert (table.id_1.to_numpy() == ref.top1_id.to_numpy()).all()
    for a, b in [("prob_1", "top1_prob"), ("entropy", "entropy"), ("kl", "kl")]:
        np.testing.assert_allclose(table[a], ref[b], rtol=1e-6)
    keep = table.next_id >= 0
    assert (table.rank_next[keep].to_numpy() == ref.rank_next[keep].to_numpy()).all()


def test_page_and_figure_come_from_the_table_alone(setup, tmp_path):
    _, adapter, tok, lenses = setup
    table = lens_grid(adapter, tok, TEXT, lenses, top_k=3)
    path = write_csv(tmp_path / "lens_grid.csv", table)
    again = read_grid(path)
    assert again.shape == table.shape and list(again.input_token) == list(table.input_token)  # "\n\t", "<" kept
    assert grid_html(again) == grid_html(table)
    data = grid_data(again)
    S = data["strings"]
    cell = data["lenses"]["tuned"][2]
    row = table[(table.lens == "tuned") & (table.layer == 2)].sort_values("position")
    assert [S[c[0]] for c in cell["tok"]] == list(row.token_1)
    np.testing.assert_allclose(cell["kl"], row.kl, atol=1e-4)
    out = plot_grid(again, tmp_path / "grid.png", stat="rank_next")
    assert out.stat().st_size > 10_000
    with pytest.raises(LensesError, match="unknown colour statistic"):
        plot_grid(again, tmp_path / "x.png", stat="bogus")
    with pytest.raises(LensesError, match="no lens 'jacobian'"):
        plot_grid(again, tmp_path / "x.png", lenses=["jacobian"])
    with pytest.raises(LensesError, match="lacks columns"):
        grid_html(again.drop(columns=["kl"]))


def test_markup_in_tokens_stays_text(setup):
    _, adapter, tok, lenses = setup
    page = grid_html(lens_grid(adapter, tok, "</script><script>alert(1)</script>", lenses), title="<b>x</b>")
    script = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in script and ">" not in script  # nothing in the data can close the block
    data = json.loads(script)
    assert "".join(data["strings"][i] for i in data["inputs"]) == "</script><script>alert(1)</script>"  # as data
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page  # no network


def test_visible_whitespace():
    assert visible(" a\n\tb\x00") == "␣a↵⇥b\\x00" and visible("") == "∅"


def test_empty_prompt_is_refused(setup):
    _, adapter, tok, lenses = setup
    with pytest.raises(LensesError, match="has no tokens"):
        lens_grid(adapter, tok, "", lenses)


def test_report_page_links_escapes_and_survives_moves(tmp_path):
    from lenses.pages.report import Report, ViewEntry

    (tmp_path / "a_layers.csv").write_text("x\n1\n")
    (tmp_path / "a.png").write_bytes(b"png")
    report = Report("run <1>", {"model": "m&m"}, [ViewEntry("a", ["share <b>0.5</b>"],
                                                            [tmp_path / "a_layers.csv", tmp_path / "a.png"], 3.2)])
    page = report.write(tmp_path).read_text()
    assert "href='a_layers.csv'" in page and "src='a.png'" in page  # relative: the folder can move
    assert "&lt;b&gt;0.5&lt;/b&gt;" in page and "<b>0.5" not in page and "m&amp;m" in page


def test_cli_grid_page_figure_and_bad_options(tmp_path, capsys):
    from tiny_models import save_tiny_model

    from lenses.base.options import run_cli
    from lenses.commands import analyze

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "o"
    argv = ["--model", str(model), "--lens", "logit", "--prompt", "a <b> c", "--out", str(out)]
    assert run_cli(analyze.main, argv + ["--html", str(out / "g.html"), "--png", str(out / "g.svg"),
                                         "--color", "kl", "--all-positions"]) == 0
    printed = capsys.readouterr().out
    assert "every position" in printed and "␣" in printed and "\\x00" in printed  # whitespace, controls visible
    table = read_grid(out / "lens_grid.csv")
    assert len(table) == 4 * 7 and set(table.layer) == {0, 1, 2, 3}
    assert (out / "g.svg").read_text().lstrip().startswith("<?xml")
    assert "a <b> c" not in (out / "g.html").read_text()  # escaped in the title, data as JSON escapes
    for extra, message in [(["--html", str(out / "g.txt")], "--html: should end in .html"),
                           (["--png", str(tmp_path)], "--png: should end in .png"),
                           (["--html", str(out / "x.html"), "--view", "facts"], "draw the grid of --prompt")]:
        assert run_cli(analyze.main, argv + extra) == 2
        assert message in capsys.readouterr().err


def test_report_keeps_views_of_earlier_runs(tmp_path):
    from lenses.pages.report import Report, ViewEntry

    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "b.png").write_bytes(b"png")
    Report("first", {"written": "T1"}, [ViewEntry("a", ["a says 1"], [tmp_path / "a.png"], 1.0)]).write(tmp_path)
    page = Report("second", {"written": "T2"}, [ViewEntry("b", ["b says 2"], [tmp_path / "b.png"], 2.0)])
    html = page.write(tmp_path).read_text()
    assert "b says 2" in html and "a says 1" in html and "from an earlier run written T1" in html
    again = Report("third", {"written": "T3"}, [ViewEntry("a", ["a says 3"], [tmp_path / "a.png"], 1.0)])
    html = again.write(tmp_path).read_text()
    assert "a says 3" in html and "a says 1" not in html and "b says 2" in html  # redone views replace
    (tmp_path / "report.json").write_text("{broken")
    assert "a says 3" in again.write(tmp_path).read_text()  # a damaged record only loses the older views
