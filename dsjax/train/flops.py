"""Model FLOPs per token and MFU, by DESIGN.md's formula (the transformers peer's, GPU.md):

    MFU = (6 · N_active · tokens + 3 · 2 · B · H · T² · (qk_nope + qk_rope + v) / 2 · L) / (time · peak)

N_active counts every matmul weight a token touches: attention projections, the dense FFNs, the
router, shared experts and num_experts_per_tok routed experts, the output head (applied once more
per MTP module), and the MTP modules' eh_proj and decoder layer when MTP is on; the embedding
lookup is excluded. Causal attention counts half the T² score and value FLOPs.
"""

from __future__ import annotations

from dsjax.config import ModelConfig


def attention_params(c: ModelConfig) -> int:
    m = c.mla
    d, h = c.hidden_size, m.num_attention_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q = d * h * qk if m.q_lora_rank is None else d * m.q_lora_rank + m.q_lora_rank * h * qk
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + h * m.v_head_dim * d


def moe_active_params(c: ModelConfig) -> int:
    moe, d = c.moe, c.hidden_size
    ffn = 3 * d * moe.moe_intermediate_size
    return d * moe.n_routed_experts + ffn * (moe.n_shared_experts + moe.num_experts_per_tok)


def active_params(c: ModelConfig, with_mtp: bool) -> int:
    """Matmul weights touched per token (embedding lookup excluded)."""
    d = c.hidden_size
    dense = c.num_dense_layers * (attention_params(c) + 3 * d * c.intermediate_size)
    moe = c.num_moe_layers * (attention_params(c) + moe_active_params(c))
    head = d * c.vocab_size
    total = dense + moe + head
    if with_mtp:
        layer = attention_params(c) + (moe_active_params(c) if c.moe.n_routed_experts else 3 * d * c.intermediate_size)
        total += c.mtp.num_nextn_predict_layers * (2 * d * d + layer + head)
    return total


def attention_layers(c: ModelConfig, with_mtp: bool) -> int:
    return c.num_hidden_layers + (c.mtp.num_nextn_predict_layers if with_mtp else 0)


def train_flops(c: ModelConfig, batch: int, seq_len: int, with_mtp: bool) -> float:
    """Model FLOPs of one forward+backward over batch × seq_len tokens."""
    m = c.mla
    dims = m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
    attn = 3 * 2 * batch * m.num_attention_heads * seq_len ** 2 * dims / 2 * attention_layers(c, with_mtp)
    return 6.0 * active_params(c, with_mtp) * batch * seq_len + attn


def mfu(c: ModelConfig, batch: int, seq_len: int, with_mtp: bool, step_seconds: float, peak_tflops: float,
        num_devices: int = 1) -> float:
    return train_flops(c, batch, seq_len, with_mtp) / (step_seconds * peak_tflops * 1e12 * num_devices)
