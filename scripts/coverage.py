#!/usr/bin/env python
# The coverage sweep lives in lenses/jobs/coverage.py (`lenses coverage` once installed); this runs it and writes
# docs/coverage.md of this repository.
import sys
from pathlib import Path

from lenses.jobs.coverage import main

if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(main(args, out=None if args else Path(__file__).resolve().parents[1] / "docs" / "coverage.md"))
