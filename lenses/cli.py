"""Shared CLI plumbing: our errors become one clear line on stderr and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import LensesError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except LensesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
