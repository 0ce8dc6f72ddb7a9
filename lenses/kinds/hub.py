"""Published lenses by hub id, fetched through `huggingface_hub` (and its local cache).

- ``neuronpedia/jacobian-lens:<name>``: the Jacobian lenses of Gurnee et al. (2026), by short name
  (``gpt2-small``) or by the model's hub id (``openai-community/gpt2``); see `JACOBIAN_LENSES`.
- ``AlignmentResearch/tuned-lens:<model>``: the tuned lenses of Belrose et al. (2023), laid out as
  ``lens/<model>/config.json`` + ``params.pt`` in that Hugging Face *space* (e.g. ``gpt2``,
  ``EleutherAI/pythia-160m-deduped``);
- any other model repository, ``owner/repo[@revision]:subfolder`` (``:`` alone for the top folder): a
  lens folder of ours (``config.json`` + ``translators.safetensors``) or of the tuned-lens package
  (``config.json`` + ``params.pt``) kept in that subfolder, e.g. community lenses one per subfolder.

Every id takes a revision after the repository (``neuronpedia/jacobian-lens@<commit>:gpt2-small``): a
branch, tag or commit of the repository; without one, ``main``.

With a network the files download once into the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` (or no
network) the cache is all that is read. Nothing downloaded is ever executed: lens files are read
with ``weights_only=True``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from lenses.base.errors import LensesError, first_line

JLENS_REPO = "neuronpedia/jacobian-lens"
TUNED_LENS_REPO = "AlignmentResearch/tuned-lens"

# short name -> (the model's hub id, the file's basename): files live at
# {short}/jlens/Salesforce-wikitext/{basename}_jacobian_lens.pt (published fits, July 2026).
JACOBIAN_LENSES: dict[str, tuple[str, str]] = {
    "gpt2-small": ("openai-community/gpt2", "gpt2"),
    "pythia-70m-deduped": ("EleutherAI/pythia-70m-deduped", "pythia-70m-deduped"),
    "gemma-2-2b": ("google/gemma-2-2b", "gemma-2-2b"),
    "gemma-2-2b-it": ("google/gemma-2-2b-it", "gemma-2-2b-it"),
    "gemma-2-9b": ("google/gemma-2-9b", "gemma-2-9b"),
    "gemma-2-9b-it": ("google/gemma-2-9b-it", "gemma-2-9b-it"),
    "gemma-2-27b": ("google/gemma-2-27b", "gemma-2-27b"),
    "gemma-3-270m": ("google/gemma-3-270m", "gemma-3-270m"),
    "gemma-3-270m-it": ("google/gemma-3-270m-it", "gemma-3-270m-it"),
    "gemma-3-1b": ("google/gemma-3-1b-pt", "gemma-3-1b-pt"),
    "gemma-3-1b-it": ("google/gemma-3-1b-it", "gemma-3-1b-it"),
    "gemma-3-4b": ("google/gemma-3-4b-pt", "gemma-3-4b-pt"),
    "gemma-3-4b-it": ("google/gemma-3-4b-it", "gemma-3-4b-it"),
    "gemma-3-12b": ("google/gemma-3-12b-pt", "gemma-3-12b-pt"),
    "gemma-3-12b-it": ("google/gemma-3-12b-it", "gemma-3-12b-it"),
    "gemma-3-27b": ("google/gemma-3-27b-pt", "gemma-3-27b-pt"),
    "gemma-3-27b-it": ("google/gemma-3-27b-it", "gemma-3-27b-it"),
    "gemma-4-e2b": ("google/gemma-4-e2b", "gemma-4-E2B"),
    "gemma-4-e4b": ("google/gemma-4-e4b", "gemma-4-E4B"),
    "gemma-4-31b": ("google/gemma-4-31b", "gemma-4-31B"),
    "gpt-oss-20b": ("openai/gpt-oss-20b", "gpt-oss-20b"),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    "llama3.1-8b-it": ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
    "llama3.3-70b-it": ("meta-llama/Llama-3.3-70B-Instruct", "Llama-3.3-70B-Instruct"),
    "olmo-3-1025-7b": ("allenai/OLMo-3-1025-7B", "Olmo-3-1025-7B"),
    "olmo-3-1125-32b": ("allenai/OLMo-3-1125-32B", "Olmo-3-1125-32B"),
    "qwen2.5-7b-it": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", "Qwen3-1.7B"),
    "qwen3-4b": ("Qwen/Qwen3-4B", "Qwen3-4B"),
    "qwen3-8b": ("Qwen/Qwen3-8B", "Qwen3-8B"),
    "qwen3-14b": ("Qwen/Qwen3-14B", "Qwen3-14B"),
    "qwen3-32b": ("Qwen/Qwen3-32B", "Qwen3-32B"),
    "qwen3.5-0.8b": ("Qwen/Qwen3.5-0.8B", "Qwen3.5-0.8B"),
    "qwen3.5-2b-pt": ("Qwen/Qwen3.5-2B", "Qwen3.5-2B-Base"),
    "qwen3.5-4b": ("Qwen/Qwen3.5-4B", "Qwen3.5-4B"),
    "qwen3.5-9b-pt": ("Qwen/Qwen3.5-9B", "Qwen3.5-9B-Base"),
    "qwen3.5-27b": ("Qwen/Qwen3.5-27B", "Qwen3.5-27B"),
}


def is_hub_id(name: str) -> bool:
    repo = str(name).split(":", 1)[0].split("@", 1)[0]
    return ":" in str(name) and repo.count("/") == 1 and not Path(repo).exists()


def parse(spec: str) -> tuple[str, str | None, str]:
    """``owner/repo[@revision]:name`` -> ``(repo, revision or None, name)``."""
    head, _, name = str(spec).partition(":")
    repo, _, revision = head.partition("@")
    return repo, revision or None, name.strip("/")


def jacobian_file(name: str) -> str:
    """The path inside `JLENS_REPO` of the published J-lens for a short name or a model's hub id."""
    for short, (model_id, base) in JACOBIAN_LENSES.items():
        if name in (short, model_id) or name.lower() == model_id.lower():
            return f"{short}/jlens/Salesforce-wikitext/{base}_jacobian_lens.pt"
    raise LensesError(f"no published Jacobian lens is known for {name!r}; known: {', '.join(JACOBIAN_LENSES)} "
                      "(or the models' hub ids). For another model fit one: lenses fit.")


def resolve(spec: str, cache_dir: str | None = None) -> Path:
    """The local path (file or folder) of a hub lens id, downloading it into the HF cache if needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, revision, name = parse(spec)
    get = partial(hf_hub_download, revision=revision, cache_dir=cache_dir)
    try:
        if repo == JLENS_REPO:
            return Path(get(JLENS_REPO, jacobian_file(name)))
        if repo == TUNED_LENS_REPO:
            files = [get(TUNED_LENS_REPO, f"lens/{name}/{f}", repo_type="space") for f in ("config.json", "params.pt")]
            return Path(files[0]).parent
        prefix = f"{name}/" if name else ""
        config = Path(get(repo, f"{prefix}config.json"))
        for weights in ("translators.safetensors", "params.pt"):  # our lens folder, or the tuned-lens package's
            try:
                get(repo, f"{prefix}{weights}")
                return config.parent
            except EntryNotFoundError:
                continue
        raise LensesError(f"{spec}: the folder {name or '(top)'} of {repo} holds a config.json but no lens weights "
                          "(translators.safetensors or params.pt); give the subfolder of a lens.")
    except LocalEntryNotFoundError as e:
        raise LensesError(f"{spec} is not in the local Hugging Face cache and cannot be downloaded here (offline, or "
                          "HF_HUB_OFFLINE=1). Download it once on a machine with a network (it lands in the cache), "
                          "or pass the lens file or folder's path.") from e
    except LensesError:
        raise
    except Exception as e:  # repository, revision or file not found, access refused, ...
        raise LensesError(f"{spec}: the hub refused it ({type(e).__name__}: {first_line(e, 200)}). "
                          "Check the repository, revision (@...) and subfolder (:...).") from e
