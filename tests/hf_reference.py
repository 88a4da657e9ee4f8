"""Tiny random transformers DeepSeek models, saved with save_pretrained, for reference tests."""

from __future__ import annotations

import torch

ROUTING = {
    "v3": dict(model_type="deepseek_v3"),
    "v2_greedy": dict(model_type="deepseek_v2", topk_method="greedy"),
    "v2_group": dict(model_type="deepseek_v2", topk_method="group_limited_greedy"),
}


def build(model_type="deepseek_v3", *, q_lora_rank=16, yarn=False, norm_topk_prob=True, topk_method=None,
          n_group=4, topk_group=2, mtp=0, seed=0, vocab_size=96, num_hidden_layers=3, rope_interleave=True):
    """A random DeepseekV3/V2ForCausalLM in float32 with every weight (norms, router bias) randomized."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=n_group,
                  topk_group=topk_group, first_k_dense_replace=1, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    if model_type == "deepseek_v3":
        cfg = DeepseekV3Config(**common, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob,
                               num_nextn_predict_layers=mtp, rope_parameters=rope, rope_interleave=rope_interleave)
        model = DeepseekV3ForCausalLM(cfg)
    else:
        cfg = DeepseekV2Config(**common, routed_scaling_factor=1.5, norm_topk_prob=False,
                               topk_method=topk_method or "greedy", rope_parameters=rope)
        model = DeepseekV2ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model.float().eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
