#!/usr/bin/env python
# The job lives in lenses/commands/train.py (also `lenses train` once installed); this file runs it.
from lenses.base.options import run_cli
from lenses.commands.train import __doc__, main  # noqa: F401  (``train_probes.py --help`` shows that text)

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
