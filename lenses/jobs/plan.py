"""The memory plan: each device's peak, by component, for a job on a model, from its config alone.

The model is built on the meta device (no weight is read or allocated) and the structural search
names its parts, so the plan knows the shapes the job will touch: L blocks, stream width d,
vocabulary V, the MLP width, the largest block. Every component is a product of those shapes and the
job's options (`Job`); `plan` adds them per device and says whether the job fits and, if not, which
option would make it fit. `lenses plan` (the CLI) prints it; `train` refuses before loading a model
whose plan does not fit.

What each component counts (bytes; ``n`` = tokens per process per step, ``s`` = bytes per element of
the model dtype, ``c`` = of the vocabulary-matmul dtype):

- ``weights``: every parameter and buffer once (tied weights once). With FSDP each process holds
  1/N of the blocks plus two gathered blocks (the one running and the one prefetched), and the
  embeddings, final norm and unembedding whole (`lenses.jobs.sharding`).
- ``lens``: float32 translators and biases of every layer (tuned: L(d^2 + d) x 4; Jacobian: L d^2 x 4).
  ``gradients`` the same again while training; ``optimizer``: SGD's momentum (1x) or Adam's two
  moments (2x). With FSDP each is 1/N per process.
- ``hidden states``: every layer's residual stream of the step, (L+1) n d s, held through the step.
- ``lens activations``: what the lens step keeps for its backward (translated states, the final norm's
  input and output, their gradients): 6 float32 copies of L n d while training (4 in a trace, 0
  for the logit lens).
- ``unembedding copy``: the unembedding in the vocabulary-matmul dtype, where it differs from the model's
  (a float32 trace of a bfloat16 model holds V d x 4 more).
- ``vocabulary``: the teacher's block (logits, log-probabilities and probabilities of up to 256
  positions, float32) and one chunk of rows x V logits and their gradient (`vocab.default_chunk_rows`).
- ``activations``: the largest transient of one block's forward (the MLP's three intermediate
  tensors, or the attention scores where attention is eager); for the J-lens fit, the autograd graph
  of every block over dim_batch copies of a prompt.

The plan is checked against the measured peak of real runs on this CPU (`benchmarks/plan_check.py`,
docs/performance.md): it counts the job's tensors, not the Python/torch runtime (a few hundred MiB
on a CPU, a CUDA context on a GPU: `runtime_bytes`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lenses.base.errors import LensesError, first_line
from lenses.base.options import ParallelOptions, option, parse_devices
from lenses.model.discovery import find_parts
from lenses.model.loading import DEFAULT_MODEL, MODELS, model_file

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
TEACHER_POSITIONS = 256  # `vocab.kl_backward`'s teacher block
RUNTIME_BYTES = {"cpu": 0.5 * GiB, "cuda": 0.6 * GiB}  # interpreter + torch (CPU), CUDA context (GPU)


def this_machine() -> tuple[str, list[int]]:
    """(kind, each device's total bytes): every CUDA device, else this machine's memory."""
    if torch.cuda.is_available():
        return "cuda", [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return "cpu", [this_machine_cpu()]


# ---------------------------------------------------------------------------- the model's shapes


@dataclass(frozen=True)
class Shapes:
    """What the plan needs to know about a model; from its config, on the meta device."""

    name: str
    num_layers: int
    d_model: int
    vocab_size: int
    intermediate: int
    heads: int
    params: int  # every parameter once (tied once)
    buffer_elems: int
    block_params: int  # the largest decoder block

    def weight_bytes(self, dtype: str) -> int:
        return (self.params + self.buffer_elems) * DTYPE_BYTES[dtype]


def _read_config(source: str | os.PathLike | None):
    from transformers import AutoConfig

    if source is None or str(source) in MODELS:
        source = model_file(str(source or DEFAULT_MODEL))
    path = Path(source)
    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path.is_file() and path.suffix == ".json":
            return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except Exception as e:  # transformers raises many types for missing or foreign configs
        first = first_line(e, 160)
        raise LensesError(f"plan: {source} has no readable model config ({type(e).__name__}: {first}). Pass a model "
                          "folder or hub id in the local cache, its config.json, or a .gguf file.") from e


def model_shapes(source=None, config=None) -> Shapes:
    """The shapes of a model named like ``--model`` (or of ``config``), built on the meta device."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else _read_config(source)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any failure to build is the same message
        raise LensesError(f"plan: transformers cannot build a causal LM from {source or 'this config'} "
                          f"({type(e).__name__}: {str(e)[:160]}); check its model_type.") from e
    parts = find_parts(model, placed=False)
    V, d = parts.unembed.weight.shape
    text = getattr(config, "text_config", None) or config
    get = lambda *names, default=None: next((getattr(text, n) for n in names if getattr(text, n, None)), default)  # noqa: E731
    return Shapes(
        name=str(source or "the default model (SmolLM2-135M-Instruct)"),
        num_layers=len(parts.layers), d_model=int(d), vocab_size=int(V),
        intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * d)),
        heads=int(get("num_attention_heads", "n_head", default=max(1, d // 64))),
        params=sum(p.numel() for p in model.parameters()),
        buffer_elems=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        block_params=max(sum(p.numel() for p in b.parameters()) for b in parts.layers),
    )


# ---------------------------------------------------------------------------- the job


def _check_kinds(text: str) -> str | None:
    bad = [k for k in (x.strip() for x in text.split(",")) if k not in ("tuned", "jacobian", "logit")]
    return f"has unknown lens kind(s) {', '.join(map(repr, bad))}; use tuned, jacobian or logit" if bad else None


@dataclass
class PlanOptions(ParallelOptions):
    """The options that decide a job's memory (the same names as the job's own options)."""

    job: str = option("train", "train (tuned lens), fit (Jacobian lens) or trace (the views)", group="recipe",
                      choices=("train", "fit", "trace"), cli=False)
    model_dtype: str = option("float32", "dtype the model's weights are loaded in", group="recipe",
                              choices=("float32", "bfloat16", "float16"))
    compute_dtype: str = option("auto", "dtype of the vocabulary matmuls (auto: bfloat16 for training, float32 for "
                                "a trace, as the jobs do where bfloat16 is native)", group="recipe",
                                choices=("auto", "float32", "bfloat16", "float16"))
    batch_size: int = option(8, "sequences per step (per step over all processes)", group="recipe", min=1)
    seq_len: int = option(256, "tokens per sequence", group="recipe", min=1)
    optimizer: str = option("sgd", "sgd or adam", group="recipe", choices=("sgd", "adam"))
    lens: str = option("tuned", "the lens kinds held: tuned, jacobian, logit (comma list for a trace)",
                       group="recipe", check=lambda v: _check_kinds(v))
    dim_batch: int = option(8, "J-lens fit: output dimensions per backward pass", group="recipe", min=1)
    devices: str | None = option(None, "the devices, e.g. 8x80GiB (none: this machine's GPUs, else its memory)",
                                 group="runtime", check=lambda v: parse_devices(v) and None)
    device_type: str | None = option(None, "cpu or cuda: which runtime overhead to count (none: from the machine)",
                                     group="runtime", choices=("cpu", "cuda"))


def _lens_bytes(shapes: Shapes, kinds: list[str]) -> int:
    L, d = shapes.num_layers, shapes.d_model
    per = {"tuned": L * (d * d + d) * 4, "jacobian": L * d * d * 4, "logit": 0}
    unknown = [k for k in kinds if k not in per]
    if unknown:
        raise LensesError(f"plan: unknown lens kind {unknown[0]!r}; use tuned, jacobian or logit.")
    return sum(per[k] for k in kinds)


def components(shapes: Shapes, o: PlanOptions, world: int) -> dict[str, int]:
    """One process's bytes by component at its peak (`world` processes; FSDP shards when ``o.fsdp``).

    Persistent terms (weights, lens, gradients, optimizer, hidden states) are held throughout; of the
    transient phases (the model's forward, the vocabulary pass, the lens's backward) only the largest
    is added, under its own name, the others are 0."""
    L, d, V, I = shapes.num_layers, shapes.d_model, shapes.vocab_size, shapes.intermediate
    s, c = DTYPE_BYTES[o.model_dtype], DTYPE_BYTES[matmul_dtype(o)]
    kinds = [k.strip() for k in o.lens.split(",") if k.strip()]
    shard = world if o.fsdp else 1
    weights = shapes.weight_bytes(o.model_dtype)
    if o.fsdp and world > 1:  # the blocks are sharded; embeddings, final norm and unembedding stay whole
        blocks = shapes.num_layers * shapes.block_params * s
        weights = (weights - blocks) + blocks // world + 2 * shapes.block_params * s
    lens = _lens_bytes(shapes, kinds if o.job == "trace" else [("jacobian" if o.job == "fit" else "tuned")])
    out = {"weights": weights, "lens": lens // shard if o.job != "trace" else lens}  # a read: every lens whole
    if o.job == "fit":
        n = o.dim_batch * o.seq_len
        out["lens"] = 3 * lens // shard  # running sums, this prompt's J, the running mean
        out["hidden states"] = 2 * (L + 1) * n * d * 4  # the captured sources and their gradients
        out["activations"] = L * n * (12 * d + 4 * I) * s  # the autograd graph of every block (estimate)
        return out
    per_process = math.ceil(o.batch_size / world) if o.job == "train" else o.batch_size
    T = o.seq_len
    n = per_process * T
    unit = L * n * d * 4  # one float32 copy of every layer's states
    forward = 3 * per_process * T * I * s  # the MLP's intermediates of one block
    if o.job == "train":
        out["gradients"] = lens // shard
        out["optimizer"] = (2 if o.optimizer == "adam" else 1) * lens // shard
        out["hidden states"] = (L + 1) * n * d * s
        held = 4 * unit  # translated states, the final norm's float32 input and output, their gradient buffer
        rows = _chunk_rows(V, matmul_dtype(o), o.device_type or "cpu")
        P = min(TEACHER_POSITIONS, n)
        vocabulary = max(3 * P * V * 4, P * V * 4 + rows * V * (2 * c + 4))
        backward = 3 * unit  # the final norm's and the translators' backward
    else:  # a trace buffers up to 256 positions (the chunk) of every layer, then decodes them
        C = min(256, n)
        out["hidden states"] = (L + 1) * (C * 4 + T * s) * d  # the buffered chunk + the text being run
        held = 2 * C * d * 4 if any(k != "logit" for k in kinds) else 0
        vocabulary = 3 * C * V * 4  # the teacher's probabilities, one layer's logits, one kernel buffer
        backward = 0
    out["unembedding copy"] = V * d * c if c != s else 0  # in the matmul dtype, cached for the whole job
    phase = max(("activations", forward), ("vocabulary", vocabulary), ("lens backward", backward), key=lambda x: x[1])
    out["lens activations"] = held
    for name in ("activations", "vocabulary", "lens backward"):
        out[name] = phase[1] if name == phase[0] else 0
    return out


def matmul_dtype(o: PlanOptions) -> str:
    if o.compute_dtype != "auto":
        return o.compute_dtype
    return "float32" if o.job == "trace" else "bfloat16"


def _chunk_rows(V: int, compute_dtype: str, device_type: str) -> int:
    """`vocab.default_chunk_rows`'s rule, without a model."""
    small = device_type == "cpu" and compute_dtype != "float32"
    budget = 24 * 2**20 if small else 400 * 2**20
    return max(1, budget // (V * DTYPE_BYTES[compute_dtype]))


@dataclass
class Plan:
    """Each device's peak (``peak_bytes``, runtime included) against its ``capacity_bytes``; ``per_device``
    holds the components; ``lens_bytes`` is the whole lens in float32 (translators and biases)."""

    model: str
    job: str
    fits: bool
    weight_bytes: int
    lens_bytes: int
    peak_bytes: list[int]
    capacity_bytes: list[int]
    advice: list[str]
    per_device: list[dict[str, int]]
    runtime_bytes: int
    device_type: str
    options: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def text(self) -> str:
        names = list(self.per_device[0])
        g = lambda v: f"{v / GiB:.2f}"  # noqa: E731
        head = ["device", *names, "runtime", "peak GiB", "of GiB"]
        rows = [[str(i), *[g(c[k]) for k in names], g(self.runtime_bytes), g(p), g(cap)]
                for i, (c, p, cap) in enumerate(zip(self.per_device, self.peak_bytes, self.capacity_bytes))]
        if len(rows) > 4 and all(r[1:] == rows[0][1:] for r in rows):  # identical devices: one line
            rows = [[f"each of {len(rows)}", *rows[0][1:]]]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
        o = self.options
        lines = [f"memory plan: {self.job} on {self.model} ({o['model_dtype']} weights, batch {o['batch_size']} x "
                 f"{o['seq_len']} tokens{', FSDP' if o['fsdp'] else ''}; GiB per device)",
                 line(head), *map(line, rows),
                 f"weights {self.weight_bytes / GiB:.2f} GiB in all; lens {self.lens_bytes / GiB:.2f} GiB in all "
                 f"(float32); {'fits' if self.fits else 'does NOT fit'}"]
        lines += [f"  to fit: {a}" for a in self.advice]
        return "\n".join(lines)


def plan(shapes: Shapes, o: PlanOptions) -> Plan:
    """Each device's peak for the job ``o`` on a model of ``shapes``, and what would make it fit."""
    kind, caps = this_machine() if not o.devices else (o.device_type or "cuda", parse_devices(o.devices))
    kind = o.device_type or kind
    o = PlanOptions(**{**asdict(o), "device_type": kind})
    world = len(caps)
    if o.job == "trace" and world > 1 and not o.fsdp:
        per = _spread(shapes, o, world)  # the model spread over the devices (--device-map)
    else:
        per = [components(shapes, o, world)] * world
    runtime = int(RUNTIME_BYTES[kind])
    peaks = [sum(c.values()) + runtime for c in per]
    kinds = [k.strip() for k in o.lens.split(",") if k.strip()]
    full_lens = _lens_bytes(shapes, kinds if o.job == "trace" else ["jacobian" if o.job == "fit" else "tuned"])
    p = Plan(model=shapes.name, job=o.job, fits=all(pk <= cap for pk, cap in zip(peaks, caps)),
             weight_bytes=shapes.weight_bytes(o.model_dtype), lens_bytes=full_lens, peak_bytes=peaks,
             capacity_bytes=caps, advice=[], per_device=per, runtime_bytes=runtime, device_type=kind,
             options=asdict(o))
    if not p.fits:
        p.advice = _advice(shapes, o, caps)
    return p


def _spread(shapes: Shapes, o: PlanOptions, world: int) -> list[dict[str, int]]:
    """A trace with the model's blocks spread evenly (accelerate's balanced map): each device holds its
    blocks, their lens layers and a copy of the final norm and unembedding, and decodes its own layers."""
    one = components(shapes, o, 1)
    head = shapes.vocab_size * shapes.d_model * DTYPE_BYTES[o.model_dtype]
    out = []
    for _ in range(world):
        c = dict(one)
        c["weights"] = (one["weights"] - head) // world + head
        c["lens"] = one["lens"] // world
        c["hidden states"] = one["hidden states"] // world + 2 * one["hidden states"] // (shapes.num_layers + 1)
        c["lens activations"] = one["lens activations"] // world
        out.append(c)
    return out


def _advice(shapes: Shapes, o: PlanOptions, caps: list[int]) -> list[str]:
    """Options that would make the job fit, cheapest change first."""
    def fits(**change) -> bool:
        q = PlanOptions(**{**asdict(o), **change})
        per = [components(shapes, q, len(caps))] * len(caps) if q.job != "trace" or len(caps) == 1 or q.fsdp else \
            _spread(shapes, q, len(caps))
        return all(sum(c.values()) + RUNTIME_BYTES[q.device_type] <= cap for c, cap in zip(per, caps))

    tips = []
    if o.job in ("train", "fit") and len(caps) > 1 and not o.fsdp and fits(fsdp=True):
        tips.append("--fsdp (shard the model and the lens over the processes)")
    if o.job != "fit":
        step = len(caps) if o.job == "train" else 1  # a training batch splits evenly over the processes
        b = (o.batch_size - 1) // step * step
        while b >= step and not fits(batch_size=b):
            b = max(step, b // 2 // step * step) if b > 8 * step else b - step
        if b >= step:
            tips.append(f"--batch-size {b}")
    elif o.dim_batch > 1 and fits(dim_batch=1):
        tips.append("--dim-batch 1")
    if o.model_dtype == "float32" and fits(model_dtype="bfloat16"):
        tips.append("--model-dtype bfloat16")
    if o.job == "train" and o.optimizer == "adam" and fits(optimizer="sgd"):
        tips.append("--optimizer sgd")
    if not tips and o.job != "trace":
        for n in (2, 4, 8, 16, 32, 64, 128, 256):
            q = PlanOptions(**{**asdict(o), "fsdp": True})
            per = components(shapes, q, n)
            if sum(per.values()) + RUNTIME_BYTES[o.device_type] <= min(caps):
                tips.append(f"{n} devices like these with --fsdp")
                break
    if not tips and o.job == "trace" and o.fsdp:
        tips.append("lenses that fit one device beside its shard (every process holds each lens whole: the logit lens "
                    "needs nothing)")
    return tips or ["more or larger devices (no option here makes it fit)"]


def check_fits(model: str | None, o: PlanOptions, world: int = 1,
               device: torch.device | str | None = None) -> Plan | None:
    """Refuse, before a weight is loaded, a job whose plan does not fit this process's device (a CPU's
    memory is shared by the `world` processes of one machine); return the plan otherwise (None when the
    model's config cannot be read: the load that follows names the problem)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        caps = [torch.cuda.get_device_properties(device.index or 0).total_memory]
    else:
        caps = [this_machine_cpu() // world]
    try:
        shapes = model_shapes(model)
    except LensesError:  # no readable config: loading the model will say what is wrong with it
        return None
    result = plan(shapes, PlanOptions(**{**asdict(o), "device_type": device.type,
                                         "devices": ",".join([f"{caps[0]}B"] * world)}))
    if not result.fits:
        raise LensesError(f"this {o.job} needs about {result.peak_bytes[0] / GiB:.1f} GiB per process but {device} "
                          f"has {caps[0] / GiB:.1f} GiB (memory plan: `lenses plan {model or ''} --{o.job}`). To fit: "
                          f"{'; or '.join(result.advice)}. (--no-plan-check runs it anyway.)")
    return result


def this_machine_cpu() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def trace_batch_size(adapter, seq_len: int = 256, cap: int = 16) -> int:
    """Texts per forward pass for the views: as many as keep one batch's hidden states and MLP intermediates
    (the trace plan's per-text terms at ``seq_len`` tokens) within a tenth of the device's memory, at
    most ``cap`` (beyond that a CPU gains nothing and a GPU little)."""
    L, d = adapter.num_layers, adapter.d_model
    s = torch.finfo(adapter.unembed.weight.dtype).bits // 8
    inter = getattr(getattr(adapter.model, "config", None), "intermediate_size", None) or 4 * d
    per_text = (L + 1) * seq_len * d * s + 3 * seq_len * inter * s
    device = adapter.device
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else this_machine_cpu())
    return max(1, min(cap, int(total // 10 // per_text)))
