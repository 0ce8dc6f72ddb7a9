"""The analysis views behind one interface.

Each view module exposes ``run(ctx) -> ViewResult`` and ``plot(result, path)``; `table.VIEWS` lists them
with the settings each reads, so ``analyze.py`` is a loop over it and a new view is one module plus one row
there. A `Context` carries the model, the lenses and the settings (`AnalysisConfig`), and reads shared
inputs (the text corpus) once for all views. The views do not import each other (an import-linter contract).
"""

from lenses.analysis.common import ViewResult
from lenses.analysis.config import AnalysisConfig
from lenses.analysis.context import Context
from lenses.analysis.table import (
                                   ACTING_VIEWS,
                                   CAUSAL_VIEWS,
                                   DEPTH_VIEWS,
                                   MODEL_SETTINGS,
                                   VIEW_NAMES,
                                   VIEW_SETTINGS,
                                   VIEWS,
                                   get_view,
                                   run_view,
                                   selected,
                                   unread,
                                   view_settings,
                                   write_view,
)

__all__ = ["AnalysisConfig", "Context", "ViewResult", "VIEWS", "VIEW_NAMES", "VIEW_SETTINGS", "MODEL_SETTINGS",
           "DEPTH_VIEWS", "CAUSAL_VIEWS", "ACTING_VIEWS", "view_settings", "selected", "unread", "get_view", "run_view",
           "write_view"]
