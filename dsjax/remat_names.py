"""The values dsjax's remat policies keep, by name (decoder.REMAT_POLICIES saves both names).

JAX's dot policies see `dot_general` only; custom kernels are invisible to them, so a remat'd
layer would re-run them in the backward pass. dsjax names what should be kept instead:

    SAVED_GEMM    forward outputs of the expert grouped GEMMs and of the FP8 GEMMs
    FP8_OPERANDS  the FP8 custom VJPs' residuals: x in the weight gradient's 128x1 tiles and w in
                  128x128 blocks (E4M3 bytes and float32 scales), made once in the forward; kept,
                  they spare the backward pass re-quantizing x (a fused pass over the activation)
                  and w (a pass over the weights) — at 1 byte per element, half a bf16 copy
    EXCHANGED     the rows (and routing metadata) an expert-parallel dispatch received from its
                  all-to-all: kept, the backward pass does not repeat the exchange to rebuild the
                  grouped GEMMs' inputs (S·N·D per MoE layer and device)

`saved` puts an optimization barrier before the name. XLA:GPU's dynamic-slice-fusion-rewriter-v2
otherwise clones the kernel call that produces a saved value into the fusion that writes it into
the layer scan's stacked residuals, and the original call stays (found in session 4: the experts'
three forward GEMMs ran twice per MoE layer, +23 ms per configs/small.py step). The barrier costs
nothing at run time.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

SAVED_GEMM = "saved_gemm"
FP8_OPERANDS = "fp8_operands"
EXCHANGED = "exchanged"


def saved(tree, name: str):
    """Every array of `tree` named `name`, behind one optimization barrier."""
    return jax.tree.map(lambda v: checkpoint_name(v, name), jax.lax.optimization_barrier(tree))
