"""``lenses push``: publish a lens folder to a hub repository with a model card (`lenses.kinds.publish`)."""

from __future__ import annotations

import argparse

from lenses.kinds.load import load_lens
from lenses.kinds.publish import FORMATS, LocalHub, push_to_hub
from lenses.kinds.sources import resolve_lens_path


def main(argv: list[str]) -> int:
    """``lenses push RUN_FOLDER REPO_ID [--subfolder S] [--revision R] [--format F] [--overwrite] [--hub-dir D]``."""

    p = argparse.ArgumentParser(prog="lenses push", description="Publish a lens folder with a model card.")
    p.add_argument("run", help="a lens folder (a train/fit --out folder) or a shipped lens name")
    p.add_argument("repo_id", help="owner/name of the hub repository")
    p.add_argument("--subfolder", default="", help="folder inside the repository (default: the top)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--format", choices=FORMATS, default="lenses", help="lenses (default) or tuned-lens 0.2's")
    p.add_argument("--overwrite", action="store_true", help="replace a lens for another model in that folder")
    p.add_argument("--hub-dir", default=None, help="a local folder standing in for the hub (stage and review)")
    a = p.parse_args(argv)
    lens = load_lens(resolve_lens_path(a.run))
    where = push_to_hub(lens, a.repo_id, a.subfolder, a.revision, a.format, a.overwrite,
                        LocalHub(a.hub_dir) if a.hub_dir else None)
    print(f"pushed the {lens.kind} lens to {where}")
    return 0
