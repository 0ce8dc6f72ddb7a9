"""The lens-grid page in a real browser: headless Chromium driven by Selenium, from a file:// URL.

Chromium and chromedriver come from Debian's packages (scripts/browser.sh installs them when apt-get
and root are there; otherwise these tests skip and say why). The screenshots are kept in
tests/artifacts/ (not committed): look at them.
"""

import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import byte_tokenizer, load_script, random_lens, tiny_model

from lenses import LogitLens
from lenses.model.adapter import ModelAdapter
from lenses.pages.grid import lens_grid, visible
from lenses.pages.grid_page import write_grid_html

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
PROMPT = "Tokens <script>alert(1)</script> & a\nnew line"


def _chromium():
    headless = load_script("headless")
    try:
        return headless.chromium()
    except headless.NoBrowser as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def browser():
    driver = _chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    model = tiny_model("llama", vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256,
                       max_position_embeddings=2048)
    adapter = ModelAdapter.from_model(model)
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.3)}
    table = lens_grid(adapter, byte_tokenizer(), PROMPT, lenses, top_k=5)
    path = write_grid_html(table, tmp_path_factory.mktemp("page") / "lens.html", title=PROMPT)
    return adapter, lenses, table, path


def _cells(browser):
    return browser.find_elements("css selector", "td.cell")


def _state(browser):
    """Text, value and background colour of every cell, in one script call."""
    return browser.execute_script(
        "return [...document.querySelectorAll('td.cell')].map(td => [+td.dataset.layer, +td.dataset.pos, "
        "td.textContent, td.dataset.value, getComputedStyle(td).backgroundColor]);")


def _darkness(rgb: str) -> int:
    return 765 - sum(int(x) for x in rgb[rgb.index("(") + 1: rgb.index(")")].split(",")[:3])


def _check_cells(browser, table, lens, stat, column):
    rows = table[table.lens == lens].set_index(["layer", "position"])
    state = _state(browser)
    assert len(state) == rows.shape[0]  # (layers + 1) x positions
    values, dark = [], []
    for layer, j, text, value, colour in state:
        row = rows.loc[(layer, j)]
        assert text == visible(row.token_1), (lens, layer, j)
        expected = row[column]
        if np.isnan(expected):
            assert value == ""
        else:
            assert float(value) == pytest.approx(expected, rel=1e-3, abs=1e-4)
            values.append(expected)
            dark.append(_darkness(colour))
    values, dark = np.array(values), np.array(dark)
    darkest = values.argmin() if stat == "rank_next" else values.argmax()  # rank 1 is darkest
    lightest = values.argmax() if stat == "rank_next" else values.argmin()
    assert dark[darkest] > dark[lightest]
    return [s[4] for s in state]


def test_page_loads_switches_and_shows_top_k(browser, grid):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains

    adapter, lenses, table, path = grid
    browser.get(path.as_uri())
    with pytest.raises(NoAlertPresentException):  # the prompt's <script> ran nothing
        browser.switch_to.alert
    header = [th.text for th in browser.find_elements("css selector", "thead th")][1:]
    assert "".join(header).replace("␣", " ").replace("↵", "\n") == PROMPT  # shown as text
    assert len(header) == table.position.nunique()
    colours = {}
    for lens in lenses:
        browser.find_element("id", f"lens-{lens}").click()
        for stat, column in [("top1_prob", "prob_1"), ("entropy", "entropy"), ("kl", "kl"),
                             ("rank_next", "rank_next")]:
            browser.find_element("id", f"stat-{stat}").click()
            colours[lens, stat] = _check_cells(browser, table, lens, stat, column)
    assert colours["logit", "top1_prob"] != colours["logit", "entropy"]
    assert colours["logit", "kl"] != colours["tuned", "kl"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.find_element("id", "stat-top1_prob").click()
    cell = _cells(browser)[len(header) + 3]  # layer 1 (second row), position 3
    ActionChains(browser).move_to_element(cell).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed()
    row = table[(table.lens == "tuned") & (table.layer == int(cell.get_attribute("data-layer")))
                & (table.position == 3)].iloc[0]
    listed = [td.text for td in tip.find_elements("css selector", "tr td:nth-child(2)")]
    assert listed == [visible(row[f"token_{r}"]) for r in range(1, 6)]
    shares = [td.text for td in tip.find_elements("css selector", "tr td:nth-child(3)")]
    assert shares[0] == f"{100 * row.prob_1:.1f}%"
    browser.save_screenshot(str(ARTIFACTS / "lens_grid.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_thousand_token_prompt_renders(browser, grid, tmp_path):
    adapter, lenses, _, _ = grid
    text = ("The quick brown fox jumps over the lazy dog. " * 25)[:1000]
    table = lens_grid(adapter, byte_tokenizer(), text, lenses, top_k=5)
    path = write_grid_html(table, tmp_path / "long.html")
    start = time.perf_counter()
    browser.get(path.as_uri())
    n = browser.execute_script("return document.querySelectorAll('td.cell').length")
    seconds = time.perf_counter() - start
    assert n == (adapter.num_layers + 1) * 1000
    width = browser.execute_script("const w = document.getElementById('wrap'); return [w.scrollWidth, w.clientWidth]")
    assert width[0] > 5 * width[1]  # it scrolls instead of shrinking
    print(f"1000-token page: {path.stat().st_size / 1e6:.2f} MB, loaded and drawn in {seconds:.2f} s")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
