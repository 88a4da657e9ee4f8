"""deepseek_v2_lite: DeepSeek-V2-Lite (15.7B, 2.4B active): no query compression (q_lora_rank None),
softmax router with greedy top-6 of 64 experts, 2 shared, YaRN ×40 (mscale 0.707).

    python scripts/convert_hf.py --hf=/path/to/DeepSeek-V2-Lite --out=/tmp/v2lite   # HF -> orbax
"""

from dsjax.config import config_dict


def get_config():
    c = config_dict()
    m = c.model
    m.vocab_size = 102400
    m.hidden_size = 2048
    m.intermediate_size = 10944
    m.num_hidden_layers = 27
    m.max_position_embeddings = 163840
    m.bos_token_id = 100000
    m.eos_token_id = 100001
    m.dtype = "bfloat16"
    m.kernel_backend = "xla_gpu"
    m.mla.num_attention_heads = 16
    m.mla.q_lora_rank = None
    m.mla.kv_lora_rank = 512
    m.mla.qk_nope_head_dim = 128
    m.mla.qk_rope_head_dim = 64
    m.mla.v_head_dim = 128
    m.rope.scaling = "yarn"
    m.rope.factor = 40.0
    m.rope.original_max_position_embeddings = 4096
    m.rope.mscale = 0.707
    m.rope.mscale_all_dim = 0.707
    m.moe.first_k_dense_replace = 1
    m.moe.moe_intermediate_size = 1408
    m.moe.n_routed_experts = 64
    m.moe.n_shared_experts = 2
    m.moe.num_experts_per_tok = 6
    m.moe.n_group = 1
    m.moe.topk_group = 1
    m.moe.topk_method = "greedy"
    m.moe.scoring_func = "softmax"
    m.moe.norm_topk_prob = False
    m.moe.routed_scaling_factor = 1.0
    return c
