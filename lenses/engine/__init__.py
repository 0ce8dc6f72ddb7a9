"""The vocabulary engine: the one place where residual-stream states become logits, KL and statistics.

Every lens, in training, held-out evaluation and tracing, decodes through this package. Its rooms:
`decoding` (states to logits, the model's own distribution), `rescored` (16-bit matmuls made exact where
single tokens are read), `kernels` (the compiled element-wise passes and the rules for compiling them),
`kl` (KL and its gradient for training, row statistics for tracing), `dtypes` (which dtype the matmuls
run in, how many rows to hold), `warmup` (compiling ahead of use). What it needs of a model is the
`protocol.Readout`; it never imports the model layer.
"""

from lenses.engine.decoding import TOPK_BLOCK, VOCAB_BLOCK, Teacher, blocks, decode, finish, top_ids, unembed
from lenses.engine.dtypes import DTYPES, compute_dtype, default_chunk_rows
from lenses.engine.kl import kl_and_grad, kl_backward, kl_rows, row_stats
from lenses.engine.protocol import Readout
from lenses.engine.rescored import RESCORED, TokenGroups, decode_rescored, rescored_stats, top1_ids
from lenses.engine.warmup import warm_up, warm_up_in_background

__all__ = ["TOPK_BLOCK", "VOCAB_BLOCK", "Teacher", "blocks", "decode", "finish", "top_ids", "unembed", "DTYPES",
           "compute_dtype", "default_chunk_rows", "kl_and_grad", "kl_backward", "kl_rows", "row_stats", "Readout",
           "RESCORED", "TokenGroups", "decode_rescored", "rescored_stats", "top1_ids", "warm_up",
           "warm_up_in_background"]
