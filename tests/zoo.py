"""Tiny offline configs for every supported architecture (random weights, no download).

Sizes are odd on purpose (intermediate 37, vocab 97) so that no kernel tile divides them.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, **_IDS)
_ATTN = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37)

ZOO = {
    "llama": dict(**_COMMON, **_ATTN),
    "mistral": dict(**_COMMON, **_ATTN, sliding_window=None),
    "qwen2": dict(**_COMMON, **_ATTN),
    "qwen3": dict(**_COMMON, **_ATTN, head_dim=12),
    "gemma": dict(**_COMMON, **_ATTN, head_dim=12, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(**_COMMON, **_ATTN, head_dim=12, query_pre_attn_scalar=12, sliding_window=8),
    "gemma3_text": dict(**_COMMON, **_ATTN, head_dim=12, query_pre_attn_scalar=12, sliding_window=8),
    "olmo2": dict(**_COMMON, **_ATTN),
    "phi3": dict(**_COMMON, **_ATTN),
    "gpt2": dict(vocab_size=VOCAB, n_layer=2, n_embd=48, n_head=4, n_inner=37, n_positions=64, **_IDS),
    "gpt_neox": dict(**_COMMON, hidden_size=48, num_attention_heads=4, intermediate_size=37),
}

# Mixture-of-experts families (ssn_runtime.core.moe): 4 experts of 13 neurons, top-2. The odd
# sizes break transformers' default grouped_mm experts path (16-byte strides), so the
# reference runs its eager per-expert loop; tests/test_moe.py also checks aligned sizes
# against the default path. DeepSeek-V3 mixes a dense first layer (37 neurons) with an MoE
# layer (a 13-neuron shared expert + 4 x 13): layers of different sizes.
_MOE = dict(num_experts_per_tok=2, experts_implementation="eager")
MOE_ZOO = {
    "mixtral": dict(**_COMMON, **{**_ATTN, "intermediate_size": 13}, num_local_experts=4, **_MOE),
    "olmoe": dict(**_COMMON, **{**_ATTN, "intermediate_size": 13}, num_experts=4, **_MOE),
    "qwen2_moe": dict(**_COMMON, **_ATTN, moe_intermediate_size=13, shared_expert_intermediate_size=19, num_experts=4,
                      **_MOE),
    "qwen3_moe": dict(**_COMMON, **_ATTN, head_dim=12, moe_intermediate_size=13, num_experts=4, **_MOE),
    "gpt_oss": dict(**_COMMON, **{**_ATTN, "intermediate_size": 13}, head_dim=12, sliding_window=8,
                    num_local_experts=4, **_MOE),
    "deepseek_v3": dict(**_COMMON, **{**_ATTN, "num_key_value_heads": 4}, moe_intermediate_size=13, n_routed_experts=4,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, **_MOE),
}


def tiny_model(model_type: str, dtype=torch.float32, seed: int = 0):
    cfg = AutoConfig.for_model(model_type, **(ZOO.get(model_type) or MOE_ZOO[model_type]))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random init is small; widen it so activations reach every region of the curves.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "ln" in name:
                p.normal_(1.0, 0.1) if model_type not in ("gemma", "gemma2", "gemma3_text") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def batch(kind: str, device="cpu"):
    """(input_ids, attention_mask) of 3 rows of lengths 7, 4, 6, padded on `kind` ("right"/"left")."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 4, 6]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, VOCAB, (n,), generator=g)
        sl = slice(0, n) if kind == "right" else slice(7 - n, 7)
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)
