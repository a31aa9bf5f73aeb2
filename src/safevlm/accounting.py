"""Full-scale parameter accounting without weights: real LLaVA architectures on the meta device."""

from __future__ import annotations

from safevlm.config import SafetyConfig

# Published LLaVA-1.5 architectures (llava-hf/llava-1.5-{7,13}b-hf): CLIP ViT-L/14 at 336 px,
# Vicuna-1.5 LM, a 32064-token vocabulary (32000 + image and padding tokens).
KNOWN_BASES = {
    "llava-1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "llava-1.5-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}

# Paper settings for the safety modules (PSA-VLM): 64 head queries, 64 prefix tokens.
PAPER_SAFETY_SETTINGS = {"num_query_tokens": 64, "num_prefix_tokens": 64, "projector_kind": "mlp"}


def llava_config(name: str):
    """The ``LlavaConfig`` of a known LLaVA-1.5 size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if name not in KNOWN_BASES:
        raise ValueError(f"unknown base {name!r}; known: {', '.join(sorted(KNOWN_BASES))}")
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, **KNOWN_BASES[name])
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
    )


def account(base_config, **safety_overrides) -> dict:
    """Build base + safety modules on the meta device and count parameters.

    Returns ``base_params``, ``safety_params``, ``ratio`` (safety / base), ``modules``
    (name -> count) and ``adapter_bytes_bf16`` (safety parameters and buffers at 2 bytes each).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from safevlm.model import SafeVLM

    with torch.device("meta"):
        base = LlavaForConditionalGeneration(base_config)
        model = SafeVLM(base, SafetyConfig.from_base_config(base_config, **safety_overrides))
    counts = model.count_parameters()
    adapter_elements = sum(t.numel() for t in model.safety_state_dict().values())
    return {
        "base_params": counts["base_params"],
        "safety_params": counts["safety_params"],
        "ratio": counts["safety_params"] / counts["base_params"],
        "modules": counts["modules"],
        "adapter_bytes_bf16": 2 * adapter_elements,
        "safety_config": model.config.to_dict(),
    }


__all__ = ["KNOWN_BASES", "PAPER_SAFETY_SETTINGS", "account", "llava_config"]
