"""CLI plumbing shared by ``train_probes.py`` and ``analyze.py``.

- Options are declared once, as dataclass fields made with `option` (default, help, checks); the
  parser is built from them (`add_options`) and parsed back into the dataclass (`from_args`), which
  then validates every value (`validate`) before any model loads.
- `run_cli` is the one place where errors become one line on stderr and exit status 2: our
  `LensesError`s, argparse's usage errors and bad values. Anything else escaping is a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from typing import Any, Callable, ClassVar

import torch

from lenses.base import lifecycle
from lenses.base.errors import LensesError
from lenses.base.io import cache_dir

UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# --------------------------------------------------------------------------- sizes people type


def parse_size(text: str) -> int:
    """``80GiB``, ``70GB``, ``512MiB``, ``1.5TiB`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)\s*", str(text), re.I)
    if not m:
        raise LensesError(f"{text!r} is not a memory size; write it like 80GiB, 70GB or 512MiB.")
    return int(float(m[1]) * UNITS[m[2].lower()])


def parse_devices(text: str) -> list[int]:
    """``8x80GiB`` or ``80GiB,80GiB,40GiB`` -> each device's bytes."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[x*]\s*(.+)", part)
        count, size = (int(m[1]), m[2]) if m else (1, part)
        if count < 1:
            raise LensesError(f"--devices {text!r}: a device count must be at least 1 (e.g. 8x80GiB).")
        try:
            out += [parse_size(size)] * count
        except LensesError:
            raise LensesError(f"--devices {text!r} does not parse; write COUNTxSIZE (8x80GiB) or sizes separated "
                              "by commas (80GiB,80GiB).") from None
    return out


def parse_max_memory(text: str | None) -> dict | None:
    """``0=70GiB,1=70GiB,cpu=200GiB`` -> accelerate's ``max_memory`` dict: device -> bytes (GPUs as ints)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        key = key.strip()
        if not sep or not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise LensesError(f"--max-memory {text!r} does not parse; write DEVICE=SIZE pairs separated by commas, "
                              "e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
        out[int(key) if key.isdigit() else key] = parse_size(size)  # bytes, as accelerate takes them
    return out


# --------------------------------------------------------------------------- declaring options


def option(default: Any, help: str, *, group: str = "runtime", min: float | None = None, above: float | None = None,
           below: float | None = None, choices: tuple | None = None, check: Callable[[Any], str | None] | None = None,
           cli: bool = True, fixed: bool | None = None):
    """A dataclass field that is also a CLI option ``--name-with-dashes``.

    ``group``: ``recipe`` (changes the result: must match on ``--resume``), ``model`` (which model
    and how to load it) or ``runtime`` (where and how to run: free to change). ``min`` (inclusive),
    ``above``/``below`` (exclusive), ``choices`` and ``check`` (returns an error text or None)
    validate the value. ``fixed``: whether the value determines a training result, so that
    ``--resume`` refuses a change (default: for the recipe and model groups).
    """
    fixed = group in ("recipe", "model") if fixed is None else fixed
    meta = dict(help=help, group=group, min=min, above=above, below=below, choices=choices, check=check, cli=cli,
                fixed=fixed)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> type:
    hints = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {})  # noqa: S307
    args = typing.get_args(hints)
    if typing.get_origin(hints) in (typing.Union, types.UnionType):
        hints = next(a for a in args if a is not type(None))
    return hints


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def add_options(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None, prefix: str = "") -> None:
    """Add one option ``--<prefix><field>`` per `option` field of ``cls``, in argument groups titled
    by ``groups`` (group name -> title; the title of ``"*"`` applies to every field)."""
    sections = {}
    for f in cli_fields(cls):
        title = (groups or {}).get("*") or (groups or {}).get(f.metadata["group"])
        if title and title not in sections:
            sections[title] = parser.add_argument_group(title)
        target = sections.get(title, parser)
        kind = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else default
        said = f.metadata["help"].replace("{OUT}", str(getattr(cls, "OUT", "")))
        help_text = said if default is None and "none:" in said else f"{said} (default: {shown})"
        dest = prefix + f.name
        if kind is bool and default is True:
            target.add_argument(flag_name("no_" + dest), dest=dest, action="store_false",
                                help=f"turn off: {f.metadata['help']} (on by default)")
        elif kind is bool:
            target.add_argument(flag_name(dest), dest=dest, action="store_true",
                                help=f"{f.metadata['help']} (off by default)")
        else:
            target.add_argument(flag_name(dest), dest=dest, type=_parser_for(kind), default=default,
                                metavar=None if f.metadata["choices"] else f.name.upper(), help=help_text,
                                choices=f.metadata["choices"] if kind is str else None)


def _parser_for(kind: type) -> Callable[[str], Any]:
    if kind is int:
        def parse_int(text: str) -> int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        return parse_int
    if kind is float:
        def parse_float(text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
            return value
        return parse_float
    return str


def from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """The dataclass ``cls`` from parsed ``args`` (fields without a CLI option keep defaults)."""
    values = {f.name: getattr(args, prefix + f.name) for f in cli_fields(cls) if hasattr(args, prefix + f.name)}
    return validate(cls(**values, **extra), prefix)


def validate(cfg, prefix: str = ""):
    """Check every `option` field's value; raise one `LensesError` naming the option and the fix."""
    for f in dataclasses.fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f.metadata.get("prefix", ""))
        if not m or value is None or isinstance(value, bool):
            continue
        name = flag_name(prefix + f.name)
        kind = _base_type(f.type) if m.get("help") else None
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LensesError(f"{name} must be a number (got {value!r}).")
        if kind is int and not isinstance(value, int):
            raise LensesError(f"{name} must be a whole number (got {value!r}).")
        if kind is str and not isinstance(value, str):
            raise LensesError(f"{name} must be a string (got {value!r}).")
        if m.get("choices") and value not in m["choices"]:
            raise LensesError(f"{name} {value!r} is not one of {', '.join(map(str, m['choices']))}.")
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise LensesError(f"{name} must be a finite number (got {value}).")
            if m.get("min") is not None and value < m["min"]:
                raise LensesError(f"{name} must be at least {m['min']} (got {value}).")
            if m.get("above") is not None and value <= m["above"]:
                raise LensesError(f"{name} must be greater than {m['above']} (got {value}).")
            if m.get("below") is not None and value >= m["below"]:
                raise LensesError(f"{name} must be less than {m['below']} (got {value}).")
        if m.get("check"):
            problem = m["check"](value)
            if problem:
                raise LensesError(f"{name}: {problem}")
    return cfg


class Options:
    """Base of the option dataclasses: every value is checked when the object is made (`validate`), so
    the Python API refuses what the CLI refuses (``TrainConfig(steps=-5)`` is an error, not a default)."""

    option_prefix = ""  # the CLI names of a class always shown with a prefix (e.g. --freq-*)

    def __post_init__(self):
        validate(self, self.option_prefix)


# The option groups every job shares, declared once (composed like `lenses.model.loading.ModelOptions`).


@dataclasses.dataclass
class RunOptions(Options):
    """Where a job writes and how it shows its progress: train, fit and analyze. A job names its own default
    folder in ``OUT``."""

    OUT: ClassVar[str] = "out"
    out: str | None = option(None, "output folder (none: {OUT})")
    overwrite: bool = option(False, "replace what an earlier run wrote in --out (a finished result, an interrupted "
                             "run, views made with other settings) and --html/--png files lenses did not write")
    progress: bool = option(True, "progress bars")

    def __post_init__(self):
        if self.out is None:
            self.out = self.OUT
        super().__post_init__()


@dataclasses.dataclass
class ResumeOptions(RunOptions):
    """A run folder with a checkpoint: training, the J-lens fit and the views (the texts each view finished)."""

    resume: bool = option(False, "continue the interrupted run in --out from its checkpoint (the views: from the "
                                 "texts they finished, on any number of processes)")


@dataclasses.dataclass
class ParallelOptions(Options):
    """Several processes: training, the J-lens fit, the views and their memory plan."""

    fsdp: bool = option(False, "shard the model's blocks and what the job fits (the lens, or the J-lens's running "
                               "sums) over the processes (PyTorch FSDP2; under torchrun, any number of processes); "
                               "the views: blocks only, the lenses whole on every process")


def check_device(name: str) -> str | None:
    """An error text if torch cannot use device ``name`` here, else None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a device name; use cpu, cuda, cuda:1, mps, ..."
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name!r} asked for, but this torch build has no usable CUDA device; use --device cpu."
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            return f"{name!r}: there are only {n} CUDA devices (0..{n - 1})."
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "mps is not available on this machine; use --device cpu."
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"{name!r}: device type {device.type!r} is not supported; use cpu or cuda."
    return None


# --------------------------------------------------------------------------- running


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``error: ...``) and exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise LensesError(f"{message} (see {self.prog} --help)")


INTERNAL_ERROR = lifecycle.EXIT["bug"]  # exit status of a bug (anything escaping that is not a LensesError)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main`` and end through one exit path (`lenses.base.lifecycle`): background work joined, and the
    outcome mapped to a documented status. Our errors print one line ``error: ...`` on stderr and return
    2. Anything else is a bug: one line ``error: internal error (...)``, the traceback saved to a crash
    log (in ``--out`` when that folder exists, else in the lenses cache folder), status 3. Ctrl-C and
    SIGTERM (what ``timeout`` and schedulers send): one line, status 130, also when the interrupt was
    swallowed on its way (a signal sets a flag that this function reads last)."""
    with lifecycle.Signals(raise_at_once=True):
        try:
            code = _outcome(main, argv)
        finally:
            lifecycle.join_background()
        if lifecycle.stop_requested() and code in (0, 2):
            if code == 0:
                print(INTERRUPTED, file=sys.stderr)
            code = lifecycle.EXIT["interrupted"]
    return code


INTERRUPTED = "interrupted: nothing finished was lost; run the same command again with --resume to continue"


def _outcome(main, argv) -> int:
    try:
        return int(main(argv) or 0)
    except LensesError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return lifecycle.EXIT["input"]
    except BrokenPipeError:  # the reader of our output went away (`lenses plan --json | head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint at exit
        return lifecycle.EXIT["broken pipe"]
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return lifecycle.EXIT["interrupted"]
    except Exception as e:  # the one place where a bug becomes a line and a log
        log = _crash_log(argv if argv is not None else sys.argv[1:])
        first = " ".join(str(e).split())[:200]
        print(f"error: internal error ({type(e).__name__}: {first}); this is a bug. The traceback is in {log}; "
              "please report it with that file.", file=sys.stderr)
        return INTERNAL_ERROR


def _crash_log(argv: list[str]) -> str:
    """Write the current exception's traceback to a crash log; return its path."""
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    out = None
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = f"lenses crash {stamp}\ncommand: {' '.join(argv)}\n\n{traceback.format_exc()}"
    folders = [Path(out)] if out and Path(out).is_dir() else []
    folders.append(cache_dir() / "crashes")
    folders.append(Path(tempfile.gettempdir()))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return str(path)
        except OSError:
            continue
    return "(no writable folder for a crash log)"
