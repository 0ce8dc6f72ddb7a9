"""One page to open first: ``index.html`` of an analysis folder, with the run's settings, and for each
view its summary lines, its figure and links to its CSV tables (all relative, so the folder can move)."""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lenses.base.io import signature, write_json, write_text
from lenses.base.version import __version__
from lenses.model.loading import DEFAULT_MODEL


@dataclass
class ViewEntry:
    """A view as the report shows it: what it printed, the files it wrote, how long it took."""

    name: str
    summary: list[str]
    files: list[Path]
    seconds: float
    earlier: str = ""  # set for a view kept from an earlier run into the same folder: when it was written
    settings: dict = field(default_factory=dict)  # what its result depends on (lenses.analysis.view_settings)
    data: list = field(default_factory=list)  # how much data it used (Usage.record() of each)


@dataclass
class Report:
    title: str
    settings: dict[str, object]
    views: list[ViewEntry] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # views asked for that have not finished (yet)
    dropped: set = field(default_factory=set)  # earlier views replaced by --overwrite: not kept
    interrupted: bool = False  # the run stopped (Ctrl-C, SIGTERM) before every view finished

    def html(self, folder: Path) -> str:
        e = html.escape
        rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in self.settings.items())
        parts = [f"<h1>{e(self.title)}</h1>", f"<table class='settings'>{rows}</table>"]
        if self.views:
            parts.append("<p>Views: " + " · ".join(f"<a href='#{e(v.name)}'>{e(v.name)}</a>" for v in self.views)
                         + "</p>")
        missing = [p for p in self.pending if p not in {v.name for v in self.views}]
        if missing and self.interrupted:
            parts.append(f"<p class='missing'><b>Missing:</b> {e(', '.join(missing))}: the run was interrupted "
                         "before they finished; run the same command again to add them.</p>")
        elif missing:
            parts.append(f"<p class='missing'><b>Not finished yet:</b> {e(', '.join(missing))} (the run is still "
                         "going, or was killed; reload the page later, or run the same command again).</p>")
        for v in self.views:
            rel = [os.path.relpath(f, folder) for f in v.files]
            figures = [r for r in rel if r.endswith(".png")]
            tables = [r for r in rel if not r.endswith(".png")]
            note = f", from an earlier run written {v.earlier}" if v.earlier else ""
            parts.append(f"<section id='{e(v.name)}'><h2>{e(v.name)} <small>({v.seconds:.0f} s{e(note)})</small></h2>")
            parts.append("<pre>" + e("\n".join(v.summary)) + "</pre>")
            parts += [f"<a href='{e(r)}'><img src='{e(r)}' alt='{e(v.name)} figure'></a>" for r in figures]
            parts.append("<p>Tables: " + ", ".join(f"<a href='{e(r)}'>{e(r)}</a>" for r in tables) + "</p></section>")
        page = _PAGE.replace("__TITLE__", e(self.title)).replace("__SIGNATURE__", signature())
        return page.replace("__BODY__", "\n".join(parts))

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``index.html`` and ``report.json`` (its record). Views of earlier runs into the same
        folder that this run did not redo stay on the page, marked as such."""
        folder = Path(folder)
        try:
            earlier = earlier_views(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            earlier = []
        now = str(self.settings.get("written", ""))
        mine = {v.name for v in self.views}
        kept = [ViewEntry(e["name"], e["summary"], [folder / f for f in e["files"]], e.get("seconds", 0.0),
                          e.get("written", ""), e.get("settings", {}), e.get("data", []))
                for e in earlier if e.get("name") not in mine | self.dropped]
        views = [ViewEntry(v.name, v.summary, v.files, v.seconds, v.earlier or now, v.settings, v.data)
                 for v in self.views] + kept
        write_json(folder / "report.json", {
            "views": [{"name": v.name, "summary": v.summary, "files": [os.path.relpath(f, folder) for f in v.files],
                       "seconds": v.seconds, "written": v.earlier, "settings": v.settings, "data": v.data}
                      for v in views],
            "missing": [p for p in self.pending if p not in {v.name for v in views}]})
        page = Report(self.title, self.settings, self.views + kept, self.pending, interrupted=self.interrupted)
        return write_text(folder / "index.html", page.html(folder))


def earlier_views(folder: str | os.PathLike) -> list[dict]:
    """The views recorded in ``folder``'s ``report.json`` (empty when there is none)."""
    import json

    file = Path(folder) / "report.json"
    if not file.exists():
        return []
    views = json.loads(file.read_text(encoding="utf-8")).get("views", [])
    return [v for v in views if isinstance(v, dict) and isinstance(v.get("name"), str)
            and isinstance(v.get("files"), list) and isinstance(v.get("summary"), list)]


def analysis_settings(cfg, lenses: dict, views: list[str]) -> dict[str, object]:
    """The settings block of an analysis report, from `AnalysisConfig` and the lenses used."""
    return {
        "model": cfg.model or DEFAULT_MODEL,
        "weights": f"{cfg.model_dtype}" + (f", {cfg.quantize}-quantized (weight-only)" if cfg.quantize else ""),
        "decode dtype": cfg.decode_dtype,
        "lenses": ", ".join(lenses),
        "views": ", ".join(views),
        "corpus": cfg.corpus or "wikipedia (default)",
        "facts": cfg.facts or "shipped set",
        "mcq": cfg.mcq or "shipped set",
        "counts": f"positions {cfg.num_positions}, texts {cfg.num_texts}, facts {cfg.num_facts or 'all'}, "
                  f"questions {cfg.num_questions}, prompts {cfg.num_prompts}",
        "seed": cfg.seed,
        "lenses version": __version__,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="__SIGNATURE__"><title>__TITLE__</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:16px auto;max-width:1100px;color:#222;padding:0 12px}
table.settings{border-collapse:collapse;margin-bottom:12px}
table.settings th{text-align:left;padding:2px 14px 2px 0;color:#555;font-weight:normal;vertical-align:top}
section{border-top:1px solid #ddd;margin-top:18px}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
img{max-width:100%;border:1px solid #eee}
h2 small{color:#888;font-weight:normal}
.missing{background:#fff3cd;padding:6px 8px}
</style></head><body>
__BODY__
</body></html>
"""
