"""small: one H200 — exactly the V3-shaped 4.3B-parameter / 0.69B-active configuration the
transformers peer was measured on (../shared/GPU.md): hidden 2048, 8 layers (1 dense), 16 heads,
q_lora 768, kv_lora 512, 64 routed experts top-6 in 8 groups keeping 4, 2 shared, vocab 32768,
batch 8 × 2048 tokens, bf16 compute, MTP off (transformers has none). GPU fast paths on: dropless
MoE through the Pallas grouped GEMM, cuDNN flash attention, the flash-decoding kernel, remat
`minimal` (without remat the step asks for one more 70 GiB buffer than fits on an H200), and the
Pallas block-scaled FP8 kernels when `--config.model.fp8=block`.

    python scripts/train.py --config=configs/small.py --workdir=/tmp/dsjax-small \
        --config.data.source=stdlib
"""

from dsjax.config import config_dict


def get_config():
    c = config_dict()
    m = c.model
    m.vocab_size = 32768
    m.hidden_size = 2048
    m.intermediate_size = 8192
    m.num_hidden_layers = 8
    m.max_position_embeddings = 32768
    m.bos_token_id = 257
    m.eos_token_id = 258
    m.dtype = "bfloat16"
    m.kernel_backend = "pallas_gpu"  # the Pallas FP8 kernels when fp8 = "block" (bf16 runs the same either way)
    m.remat = "minimal"
    m.attention = "cudnn"
    m.decode_attention = "pallas"
    m.mla.num_attention_heads = 16
    m.mla.q_lora_rank = 768
    m.mla.kv_lora_rank = 512
    m.mla.qk_nope_head_dim = 128
    m.mla.qk_rope_head_dim = 64
    m.mla.v_head_dim = 128
    m.moe.first_k_dense_replace = 1
    m.moe.moe_intermediate_size = 1408
    m.moe.n_routed_experts = 64
    m.moe.n_shared_experts = 2
    m.moe.num_experts_per_tok = 6
    m.moe.n_group = 8
    m.moe.topk_group = 4
    m.moe.routed_scaling_factor = 2.5
    m.moe.grouped_gemm = "pallas_mgpu"
    m.mtp.num_nextn_predict_layers = 0
    c.data.seq_len = 2048
    c.train.batch_size = 8
    c.train.steps = 1000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.bf16_moments = True  # both AdamW moments in bf16, as DeepSeek-V3 (§3.3.3); the peer's are bf16 too
    return c
