"""FP8 training per DeepSeek-V3 §3.3: block quantization and the fp8 GEMM (custom_vjp).

    q, scale = fp8.quantize_blocks(x, (1, 128))      # activations; (128, 128) for weights
    x_hat = fp8.dequantize_blocks(q, scale, (1, 128))
    fp8_dot = fp8.make_dot(config.fp8, config.kernel_backend)
    y = fp8_dot(x, w)                                # x [..., K], w [K, *N]
    y = fp8_dot(x, w, batched=True)                  # x [E, C, K], w [E, K, N]
"""

from dsjax.fp8.dot import BACKENDS, MODES, Fp8Dot, make_dot
from dsjax.fp8.quantize import E4M3_MAX, dequantize_blocks, quantize_blocks
from dsjax.fp8.grouped import gmm_block  # noqa: F401 - y = fp8.gmm_block(x, w, group_sizes, backend)

__all__ = ["BACKENDS", "E4M3_MAX", "MODES", "Fp8Dot", "dequantize_blocks", "make_dot",
           "quantize_blocks"]
