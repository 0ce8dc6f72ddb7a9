"""Testing what a lens reads by acting on the model: edits, decompositions, causal bases, swaps, Patchscopes.

Edits along lens directions (`edits`), the sparse decomposition of a state over a lens's token dictionary and
coordinate patching (`decompose`), causal bases and stimulus-response alignment (`fidelity`), the causal swap
benchmark (`swap`), Patchscopes (`patchscope`) and the sites the views act on (`sites`). Lens directions
themselves are `Lens.directions` (`lenses.kinds.directions`)."""

from lenses.causal.decompose import CoordinatePatch, Decomposition, decompose, patch_coordinate
from lenses.causal.edits import ablate, remove_subspace, run_edited, steer
from lenses.causal.fidelity import CausalBasis, aitchison, causal_basis, principal_angles
from lenses.causal.patchscope import IDENTITY_PROMPT, patchscope, patchscope_grid

__all__ = ["CoordinatePatch", "Decomposition", "decompose", "patch_coordinate", "ablate", "remove_subspace",
           "run_edited", "steer", "CausalBasis", "aitchison", "causal_basis", "principal_angles", "IDENTITY_PROMPT",
           "patchscope", "patchscope_grid"]
