#!/usr/bin/env python
# The job lives in lenses/commands/analyze.py (also `lenses analyze` once installed); this file runs it.
from lenses.base.options import run_cli
from lenses.commands.analyze import __doc__, main  # noqa: F401  (``analyze.py --help`` shows that text)

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
