"""Publishing a lens to a hub repository, with a model card, in our format or tuned-lens's.

``push_to_hub(lens, repo_id, subfolder=..., format="lenses" | "tuned-lens")`` stages the lens folder (ours:
``config.json`` + ``translators.safetensors``; tuned-lens 0.2's: ``config.json`` + ``params.pt``, which
``TunedLens.from_model_and_pretrained`` reads; a Jacobian lens also as the published ``jacobian_lens.pt`` that
TransformerLens 4.3's ``JacobianLens`` reads) with a ``README.md`` card (base model and revision, recipe,
input convention, held-out KL per layer, licence notice), then uploads it through ``huggingface_hub``.

A folder of the repository that already holds a lens made for another model (another fingerprint or model
id) is refused unless ``overwrite=True``. ``hub`` is where the repository lives: `HubRepo` (the Hugging Face
hub; needs a network and a token) or `LocalHub` (a folder standing in for it: tests, or staging to review).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lenses.base.errors import LensesError, first_line
from lenses.model import fingerprint

FORMATS = ("lenses", "tuned-lens")
NOTICES = {  # model families whose licence must travel with anything derived from them
    "gemma": "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms. "
             "This lens is derived from Gemma's weights and is distributed under those terms.",
    "llama": "Built with Llama: derived from a Llama model and subject to its licence (Llama Community Licence).",
}


class LocalHub:
    """A folder standing in for the hub: ``<root>/<repo_id>/<revision>/<path>``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def read(self, repo_id: str, path: str, revision: str) -> bytes | None:
        file = self.root / repo_id / revision / path
        return file.read_bytes() if file.is_file() else None

    def upload_folder(self, folder: Path, repo_id: str, path_in_repo: str, revision: str, message: str) -> str:
        dest = self.root / repo_id / revision / path_in_repo
        dest.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            shutil.copyfile(f, dest / f.name)
        return str(dest)


class HubRepo:
    """The Hugging Face hub through ``huggingface_hub`` (a token from ``huggingface-cli login`` or HF_TOKEN)."""

    def read(self, repo_id: str, path: str, revision: str) -> bytes | None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, path, revision=revision)).read_bytes()
        except Exception:  # no such repository, revision or file yet: nothing to protect
            return None

    def upload_folder(self, folder: Path, repo_id: str, path_in_repo: str, revision: str, message: str) -> str:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(repo_id, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo or None,
                                     revision=revision, commit_message=message)
        except Exception as e:  # network, token, permissions
            raise LensesError(f"the hub refused the upload to {repo_id} ({type(e).__name__}: "
                              f"{first_line(e, 160)}); check the network and your token "
                              "(huggingface-cli login), or stage it locally with --hub-dir DIR.") from e
        return str(getattr(info, "commit_url", info))


def card(lens, fmt: str) -> str:
    """The model card of a lens: what it reads, how it was made, how well it reads (held-out KL per layer)."""
    c = lens.config
    model = str(c.get("model") or "unknown")
    revision = c.get("model_revision") or "the revision whose weights give the fingerprint in config.json"
    conv = c.get("input") or {}
    prefix = (f"{conv.get('prefix_text') or conv.get('prefix')} first, as the tokenizer adds it" if conv.get("prefix")
              else "the tokenizer's defaults, which add no special token" if "prefix" in conv else "not recorded")
    training = c.get("training") or {k: c[k] for k in ("corpus", "n_prompts", "seq_len", "skip_first") if k in c}
    recipe = ", ".join(f"{k} {v}" for k, v in training.items() if k != "data" and not isinstance(v, dict))
    kl = c.get("heldout_kl_nats") or []
    rows = "\n".join(f"| {i} | {v:.3f} |" for i, v in enumerate(kl) if v is not None)
    notice = next((text for key, text in NOTICES.items() if key in model.lower()), "")
    load = ("`lenses.load_lens(\"REPO:SUBFOLDER\", model)`" if fmt == "lenses" else
            "`tuned_lens.TunedLens.from_model_and_pretrained(model, \"REPO\", subfolder=\"SUBFOLDER\")` or lenses")
    return (f"---\nbase_model: {model}\nlibrary_name: lenses\ntags: [interpretability, {lens.kind}-lens]\n---\n\n"
            f"# {lens.kind.capitalize()} lens for {model}\n\n"
            f"- **Base model**: {model} ({revision}); {lens.num_layers} layers, d = {lens.d_model}.\n"
            f"- **Input convention**: {prefix}.\n"
            f"- **Recipe**: {recipe or 'not recorded'}.\n"
            f"- **Format**: {fmt}; load with {load}.\n\n"
            + (f"Held-out KL(final || lens), nats per token:\n\n| layer | KL |\n|---:|---:|\n{rows}\n\n"
               if rows else "")
            + (f"## Licence\n\n{notice}\n" if notice else "")
            )


def _check_target(hub, repo_id: str, subfolder: str, revision: str, lens, overwrite: bool) -> None:
    raw = hub.read(repo_id, f"{subfolder}/config.json" if subfolder else "config.json", revision)
    if raw is None or overwrite:
        return
    try:
        there = json.loads(raw)
    except ValueError:
        there = {}
    ours, theirs = lens.config.get("fingerprint"), there.get("fingerprint")
    same_model = fingerprint.same_model(ours, theirs) if isinstance(theirs, dict) else None
    if same_model is None:
        named = str(there.get("model") or there.get("base_model_name_or_path") or "")
        same_model = (ours == theirs) if (ours and theirs) else named == str(lens.config.get("model") or "")
    if not same_model:
        raise LensesError(f"{repo_id}:{subfolder or '(top)'} already holds a lens for another model "
                          f"({there.get('model') or there.get('base_model_name_or_path') or 'unknown'}); push into "
                          "another --subfolder, or pass --overwrite (overwrite=True) to replace it.")


def push_to_hub(lens, repo_id: str, subfolder: str = "", revision: str | None = None, format: str = "lenses",
                overwrite: bool = False, hub=None, message: str | None = None) -> str:
    """Upload ``lens`` (with its card) to ``repo_id`` [``subfolder``] at ``revision`` (default ``main``)."""
    if format not in FORMATS:
        raise LensesError(f"unknown format {format!r}: use {' or '.join(FORMATS)}.")
    if format == "tuned-lens" and lens.kind != "tuned":
        raise LensesError(f"the tuned-lens format holds tuned lenses only, not a {lens.kind} lens: use "
                          "format='lenses'.")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LensesError(f"repo_id {repo_id!r} is not owner/name: e.g. me/gemma-3-270m-lenses.")
    hub, revision, subfolder = hub or HubRepo(), revision or "main", subfolder.strip("/")
    _check_target(hub, repo_id, subfolder, revision, lens, overwrite)
    with tempfile.TemporaryDirectory(prefix="lenses-push-") as tmp:
        stage = Path(tmp)
        if format == "tuned-lens":
            lens.save_tuned_lens_format(stage)
        else:
            lens.save_pretrained(stage, overwrite=True)
            if lens.kind == "jacobian" and hasattr(lens, "save_published"):
                lens.save_published(stage / "jacobian_lens.pt", dtype=torch.float32)  # exact, as fitted
        (stage / "README.md").write_text(card(lens, format), encoding="utf-8")
        return hub.upload_folder(stage, repo_id, subfolder, revision,
                                 message or f"{lens.kind} lens for {lens.config.get('model', 'a model')} (lenses)")
