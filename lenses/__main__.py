"""``lenses``: the installed command (also ``python -m lenses``).

    lenses train ...      train a tuned lens (``train_probes.py``)
    lenses fit ...        fit a Jacobian lens
    lenses analyze ...    the depth views, causal checks and the layer-by-position grid (``analyze.py``)
    lenses plan ...       each device's peak memory for a job, before any weight loads
    lenses push ...       publish a lens folder with a model card (lenses or tuned-lens format)
    lenses catalog ...    every published lens we know of, by model and kind (offline)

``lenses <job> --help`` lists a job's options. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

JOBS = {
    "train": "train a tuned lens",
    "fit": "fit a Jacobian lens",
    "analyze": "depth views, causal checks and the layer-by-position grid of a prompt",
    "plan": "each device's peak memory for a job, by component, before any weight loads",
    "push": "publish a lens folder to a hub repository with a model card (ours or tuned-lens's format)",
    "catalog": "the published lenses (tuned-lens space, Neuronpedia J-lenses, ours), listed offline",
    "coverage": "check every causal-LM type of transformers as a tiny random model (docs/coverage.md)",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, what in JOBS.items())
    return f"usage: lenses <job> [options]   (lenses <job> --help for a job's options)\n\njobs:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    from lenses.base.options import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    job, rest = argv[0], argv[1:]
    if job in ("--version", "version"):
        from lenses.base.version import __version__

        print(f"lenses {__version__}")
        return 0
    if job not in JOBS:
        print(f"error: unknown job {job!r}; choose one of {', '.join(JOBS)} (see lenses --help)", file=sys.stderr)
        return 2
    if job == "push":
        from lenses.commands import push

        return run_cli(push.main, rest)
    if job == "catalog":
        from lenses.kinds import catalog

        return run_cli(catalog.main, rest)
    if job == "coverage":
        from lenses.jobs import coverage

        return coverage.main(rest)
    if job == "plan":
        from lenses.commands import plan

        return run_cli(lambda a: plan.main(a, prog="lenses plan"), rest)
    if job == "analyze":
        from lenses.commands import analyze

        return run_cli(lambda a: analyze.main(a, prog="lenses analyze"), rest)
    if job == "fit":
        from lenses.commands import fit

        return run_cli(lambda a: fit.main(a, prog="lenses fit"), rest)
    from lenses.commands import train

    return run_cli(lambda a: train.main(a, prog="lenses train"), rest)


if __name__ == "__main__":
    raise SystemExit(main())
