"""tiny: the CPU / CI preset — a 3-layer DeepSeek-V3 (1 dense + 2 MoE layers, 8 experts in 4
groups, 1 shared expert, MTP depth 1) at width 64 over the byte vocabulary, float32 compute.

    python scripts/train.py --config=configs/tiny.py --workdir=/tmp/dsjax-tiny

trains on the embedded arithmetic corpus: 300 steps, the loss from ~5.6 (uniform over 264 ids) to
~0.5 nats/token in about a minute on a 2-core CPU (BENCHMARKS.md).
"""

from dsjax.config import config_dict


def get_config():
    c = config_dict()
    m = c.model
    m.vocab_size = 264  # 256 bytes + pad/bos/eos, rounded up to a multiple of 8
    m.hidden_size = 64
    m.intermediate_size = 192
    m.num_hidden_layers = 3
    m.max_position_embeddings = 1024
    m.bos_token_id = 257
    m.eos_token_id = 258
    m.dtype = "float32"
    m.mla.num_attention_heads = 4
    m.mla.q_lora_rank = 48
    m.mla.kv_lora_rank = 32
    m.mla.qk_nope_head_dim = 16
    m.mla.qk_rope_head_dim = 8
    m.mla.v_head_dim = 16
    m.moe.first_k_dense_replace = 1
    m.moe.moe_intermediate_size = 48
    m.moe.n_routed_experts = 8
    m.moe.n_shared_experts = 1
    m.moe.num_experts_per_tok = 2
    m.moe.n_group = 4
    m.moe.topk_group = 2
    m.moe.routed_scaling_factor = 2.5
    m.mtp.num_nextn_predict_layers = 1
    c.data.seq_len = 256
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
