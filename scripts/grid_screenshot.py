#!/usr/bin/env python
"""Regenerate docs/lens_grid.png (the README's picture): the grid page of the default model with the
logit and shipped tuned lens on a sentence, opened in headless Chromium, one cell hovered.

    .venv/bin/python scripts/grid_screenshot.py [--prompt TEXT] [--out docs/lens_grid.png]
    .venv/bin/python scripts/grid_screenshot.py --chat --generate 16 --prompt "What is the capital of France?" \
        --out docs/chat_grid.png      # a chat answer the model generated, traced (scrolled to the answer)
"""

import argparse
import tempfile
import time
from pathlib import Path

from lenses.kinds.registry import select_lenses
from lenses.model.loading import ModelOptions
from lenses.pages.grid import lens_grid
from lenses.pages.grid_page import write_grid_html

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="The Eiffel Tower is in the city of Paris, the capital of France.")
    p.add_argument("--out", default=str(ROOT / "docs" / "lens_grid.png"))
    p.add_argument("--lens", default="tuned", help="lens shown in the screenshot")
    p.add_argument("--chat", action="store_true", help="the prompt as the user turn of the chat template")
    p.add_argument("--generate", type=int, default=0, help="generate this many tokens (greedy) and trace them too")
    a = p.parse_args()
    from headless import chromium as _chromium  # scripts/headless.py, beside this script
    from selenium.webdriver.common.action_chains import ActionChains

    model, tok, adapter = ModelOptions().load()
    start = time.perf_counter()
    from lenses.text.chat import chat_turn, generate

    if a.chat:
        turn = chat_turn(tok, a.prompt)
        ids, roles = turn.ids, turn.roles
    else:
        ids = tok(a.prompt, add_special_tokens=False).input_ids
        roles = ["text"] * len(ids)
    if a.generate:
        new = generate(model, ids, a.generate, eos=tok.eos_token_id)
        ids, roles = ids + new, roles + ["generated"] * len(new)
        print(f"generated: {tok.decode(new)!r}")
    table = lens_grid(adapter, tok, a.prompt, select_lenses("auto", adapter), ids=ids, roles=roles)
    page = write_grid_html(table, Path(tempfile.mkdtemp()) / "lens.html", title=f"SmolLM2-135M-Instruct: {a.prompt}")
    print(f"grid of {table.position.nunique()} tokens in {time.perf_counter() - start:.1f} s, "
          f"page {page.stat().st_size / 1e3:.0f} kB")
    browser = _chromium()
    try:
        browser.set_window_size(1500, 1000)
        browser.get(page.as_uri())
        browser.find_element("id", f"lens-{a.lens}").click()
        cells = browser.find_elements("css selector", "td.cell")
        n = table.position.nunique()
        if a.generate:  # the answer is at the right end of a long templated row
            browser.execute_script("document.getElementById('wrap').scrollLeft = 1e6")
        ActionChains(browser).move_to_element(cells[20 * n + n - 9]).perform()  # layer 20, a late position
        browser.save_screenshot(a.out)
    finally:
        browser.quit()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
