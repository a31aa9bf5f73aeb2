"""Full-scale parameter accounting without weights: real VLM architectures on the meta device."""

from __future__ import annotations

import json

from safevlm.config import SafetyConfig

# Published LLaVA-1.5 architectures (llava-hf/llava-1.5-{7,13}b-hf): CLIP ViT-L/14 at 336 px,
# Vicuna-1.5 LM, a 32064-token vocabulary (32000 + image and padding tokens).
KNOWN_BASES = {
    "llava-1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "llava-1.5-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}



def _llava_next_mistral_7b():
    """llava-hf/llava-v1.6-mistral-7b-hf, its config.json typed in: CLIP ViT-L/14-336 tiles
    (anyres pinpoints 1x2 / 2x1 / 2x2 / 3x1 / 1x3 of 336), Mistral-7B-Instruct-v0.2 LM with a
    32064-token vocabulary. Published: 7,566,747,648 parameters."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    text = MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, vocab_size=32000,
    )
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def _llava_onevision_qwen2_7b():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf, its config.json typed in: SigLIP-so400m tiles
    (26 layers, 384 px, patch 14, no head; anyres pinpoints up to 6x6 tiles of 384,
    ``anyres_max_9``), Qwen2-7B-Instruct LM with a 152128-token vocabulary (151646 <image>,
    151647 <video>). Published: 8.03B parameters; counted here: 8,030,807,584."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14, vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=151646, video_token_index=151647,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
        image_grid_pinpoints=[[r * 384, c * 384] for r in range(1, 7) for c in range(1, 7)],
    )


# Qwen/Qwen2-VL-7B-Instruct's config.json (huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json),
# typed in with its own (legacy, text fields at the top level) layout; both transformers lines read
# it with from_dict, as they read the hub's file. ViT 32 x 1280 (patch 14, 2 x 2 merge units; the
# merger maps each to 3584), Qwen2-7B LM with M-RoPE. Published: 8,291,375,616 parameters.
QWEN2_VL_7B_INSTRUCT = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
}

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json):
# the same LM (128k positions), a ViT 32 x 1280 with SwiGLU MLPs (3420), RMSNorm, window attention
# (112 px windows, full attention in blocks 7, 15, 23, 31). Published: 8,292,166,656 parameters.
QWEN2_5_VL_7B_INSTRUCT = {
    **QWEN2_VL_7B_INSTRUCT,
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "max_position_embeddings": 128000,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}


def _qwen2_vl_7b():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig.from_dict(dict(QWEN2_VL_7B_INSTRUCT))


def _qwen2_5_vl_7b():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(dict(QWEN2_5_VL_7B_INSTRUCT))


# google/gemma-3-4b-it's config.json (huggingface.co/google/gemma-3-4b-it/blob/main/config.json), typed in
# as the hub's file is (it names few text fields: transformers' Gemma3TextConfig defaults fill the rest,
# 8 heads, 4 KV heads, head_dim 256, a 262208-token vocabulary); both lines read it with from_dict.
# SigLIP 27 x 1152 at 896 px (patch 14: 64 x 64 features, pooled to 256 image tokens), Gemma 3 LM
# 34 x 2560, local layers with a 1024-token window, the LM head tied to the token embeddings
# (one tensor, counted once). Published: 4,300,079,472 parameters (the release's safetensors metadata).
GEMMA_3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
    "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}

# google/gemma-3-12b-it's config.json: the same vision tower and layout, an LM of 48 x 3840
# (16 heads, 8 KV heads). Published: 12,187,325,040 parameters (the release's safetensors metadata).
GEMMA_3_12B_IT = {
    **GEMMA_3_4B_IT,
    "text_config": {
        "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
    },
}


def _gemma3(config: dict):
    from transformers import Gemma3Config

    return Gemma3Config.from_dict(json.loads(json.dumps(config)))  # a deep copy: from_dict may edit nested dicts


def _gemma_3_4b_it():
    return _gemma3(GEMMA_3_4B_IT)


def _gemma_3_12b_it():
    return _gemma3(GEMMA_3_12B_IT)


# Other families' 7B-class releases (sources: each release's config.json on the Hugging Face hub,
# as quoted in the builders' docstrings and above the Qwen config dicts), by the name
# `safevlm params --base` takes.
RELEASES = {
    "llava-v1.6-mistral-7b": _llava_next_mistral_7b,
    "llava-onevision-qwen2-7b-ov": _llava_onevision_qwen2_7b,
    "qwen2-vl-7b-instruct": _qwen2_vl_7b,
    "qwen2.5-vl-7b-instruct": _qwen2_5_vl_7b,
    # Gemma 3 has no 7B: its 4B is the nearest, the 12B the next
    "gemma-3-4b-it": _gemma_3_4b_it,
    "gemma-3-12b-it": _gemma_3_12b_it,
}


def known_base_config(name: str):
    """The config of a known architecture: a LLaVA-1.5 size or a release in :data:`RELEASES`."""
    if name in RELEASES:
        return RELEASES[name]()
    if name in KNOWN_BASES:
        return llava_config(name)
    raise ValueError(f"unknown base {name!r}; known: {', '.join(sorted([*KNOWN_BASES, *RELEASES]))}")


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


def account(base_config, guard_only: bool = False, **safety_overrides) -> dict:
    """Build base + safety modules on the meta device and count parameters.

    Returns ``base_params``, ``safety_params``, ``ratio`` (safety / base), ``modules``
    (name -> count) and ``adapter_bytes_bf16`` (safety parameters and buffers at 2 bytes each).

    ``guard_only`` adds what a guard-only load holds (:func:`safevlm.bases.drop_language_model`:
    vision tower, token embeddings, safety modules) against the full model (base + safety
    modules): ``guard_only_params``, ``guard_only_modules`` (part -> count),
    ``full_params``, ``guard_only_share`` (guard-only / full), and both sizes at 2 bytes per
    parameter, ``guard_only_bytes_bf16`` / ``full_bytes_bf16``.
    """
    import torch

    from safevlm.backbones import get_backbone_class

    from safevlm.bases import drop_language_model, guard_modules
    from safevlm.model import SafeVLM

    with torch.device("meta"):
        base = get_backbone_class(base_config).model_class()(base_config)
        model = SafeVLM(base, SafetyConfig.from_base_config(base_config, **safety_overrides))
    counts = model.count_parameters()
    adapter_elements = sum(t.numel() for t in model.safety_state_dict().values())
    result = {
        "base_params": counts["base_params"],
        "safety_params": counts["safety_params"],
        "ratio": counts["safety_params"] / counts["base_params"],
        "modules": counts["modules"],
        "adapter_bytes_bf16": 2 * adapter_elements,
        "safety_config": model.config.to_dict(),
    }
    if guard_only:
        full = counts["base_params"] + counts["safety_params"]
        drop_language_model(base)  # on the meta device: what a guard-only load keeps
        parts = {name: sum(p.numel() for p in module.parameters()) for name, module in guard_modules(base).items()}
        guard = sum(p.numel() for p in model.parameters())
        if guard != sum(parts.values()) + counts["safety_params"]:  # pragma: no cover - a part guard_modules misses
            raise RuntimeError(f"guard-only base holds {guard - counts['safety_params']} parameters, "
                               f"its guard parts {sum(parts.values())}")
        result.update({
            "guard_only_params": guard,
            "guard_only_modules": {**parts, "safety_modules": counts["safety_params"]},
            "full_params": full,
            "guard_only_share": guard / full,
            "guard_only_bytes_bf16": 2 * guard,
            "full_bytes_bf16": 2 * full,
        })
    return result


__all__ = ["KNOWN_BASES", "PAPER_SAFETY_SETTINGS", "RELEASES", "account", "known_base_config", "llava_config"]
