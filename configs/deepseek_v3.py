"""deepseek_v3: the official 671B DeepSeek-V3 / R1 architecture (config.json of deepseek-ai/DeepSeek-V3):
61 layers (3 dense), 256 routed experts top-8 in 8 groups keeping 4, 1 shared, MLA with
q_lora 1536 / kv_lora 512, YaRN ×40 from 4K, one MTP module. 671.0B parameters (682.6B with MTP
sharing embedding and head), ~37B activated per token.

    python scripts/plan.py --config=configs/deepseek_v3.py     # memory plan, no weights needed
"""

from dsjax.config import config_dict


def get_config():
    c = config_dict()
    m = c.model
    m.vocab_size = 129280
    m.hidden_size = 7168
    m.intermediate_size = 18432
    m.num_hidden_layers = 61
    m.max_position_embeddings = 163840
    m.bos_token_id = 0
    m.eos_token_id = 1
    m.dtype = "bfloat16"
    m.kernel_backend = "xla_gpu"
    m.remat = "full"
    m.mla.num_attention_heads = 128
    m.mla.q_lora_rank = 1536
    m.mla.kv_lora_rank = 512
    m.mla.qk_nope_head_dim = 128
    m.mla.qk_rope_head_dim = 64
    m.mla.v_head_dim = 128
    m.rope.scaling = "yarn"
    m.rope.factor = 40.0
    m.rope.original_max_position_embeddings = 4096
    m.rope.beta_fast = 32.0
    m.rope.beta_slow = 1.0
    m.rope.mscale = 1.0
    m.rope.mscale_all_dim = 1.0
    m.moe.first_k_dense_replace = 3
    m.moe.moe_intermediate_size = 2048
    m.moe.n_routed_experts = 256
    m.moe.n_shared_experts = 1
    m.moe.num_experts_per_tok = 8
    m.moe.n_group = 8
    m.moe.topk_group = 4
    m.moe.routed_scaling_factor = 2.5
    m.mtp.num_nextn_predict_layers = 1
    c.data.seq_len = 4096
    c.train.mtp_weight = 0.3
    return c
