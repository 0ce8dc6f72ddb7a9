"""``lenses plan``: each device's peak memory for a job, by component, before any weight loads.

    lenses plan                                        # training the default model on this machine
    lenses plan tests/data/configs/llama-3.3-70b.json --train --devices 8x80GiB --fsdp --model-dtype bfloat16
    lenses plan meta-llama/Llama-3.1-8B --trace --devices 1x24GiB --json

MODEL is what --model takes (a folder, a cached hub id, a .gguf file) or a config.json: only the config
is read, and the model is built on the meta device. The options are the job's own (--batch-size,
--seq-len, --model-dtype, --optimizer, ...). Prints a table (GiB per device: weights, lens, gradients,
optimizer state, hidden states, vocabulary chunks, activations, runtime), whether it fits, and which
option would make it fit; --json prints one object instead. Exit status 0 whether or not it fits.
"""

from __future__ import annotations

from lenses.base.options import Parser, add_options, from_args
from lenses.jobs.plan import PlanOptions, model_shapes, plan


def main(argv=None, prog: str = "lenses plan") -> int:
    p = Parser(description=__doc__, prog=prog)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder, cached hub id, .gguf file or config.json (default: the default model)")
    jobs = p.add_mutually_exclusive_group()
    for job, what in (("train", "training a tuned lens (default)"), ("trace", "the views (tracing lenses)"),
                      ("fit", "fitting a Jacobian lens")):
        jobs.add_argument(f"--{job}", dest="job", action="store_const", const=job, help=what)
    p.set_defaults(job="train")
    add_options(p, PlanOptions, {"recipe": "the job's options", "runtime": "where it runs"})
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)
    options = from_args(PlanOptions, a, job=a.job)
    result = plan(model_shapes(a.model), options)
    print(result.to_json() if a.json else result.text())
    return 0
