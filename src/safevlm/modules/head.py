"""Safety head: learned queries cross-attend over [safety features ; prompt token embeddings].

It never calls the language model, so it can run alone ("guard mode"). Padding in the prompt
is masked out of attention, so a sample's logits do not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from safevlm.config import SafetyConfig


@dataclass
class SafetyHeadOutput:
    """level_logits (B, num_levels), type_logits (B, num_types); probabilities are
    ``softmax(logits / T)`` with the head's temperatures T (1 unless ``safevlm calibrate`` has
    fitted them); safety_state (B, head width) is the state the classifiers read (and that
    conditions the prefix tokens)."""

    level_logits: torch.Tensor
    type_logits: torch.Tensor
    level_probs: torch.Tensor
    type_probs: torch.Tensor
    safety_state: torch.Tensor | None = None


class _CrossAttentionLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, W), keys (B, K, W) already normalised, key_mask (B, K) True = attend."""
        b, nq, w = queries.shape
        h = self.num_heads
        q = self.q(self.norm_q(queries)).view(b, nq, h, w // h).transpose(1, 2)
        k, v = self.kv(keys).view(b, keys.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        queries = queries + self.dropout(self.out(attn.transpose(1, 2).reshape(b, nq, w)))
        return queries + self.dropout(self.ffn(self.norm_ffn(queries)))


class SafetyHead(nn.Module):
    """Predicts a risk level and a risk type for each sample."""

    def __init__(self, config: SafetyConfig):
        super().__init__()
        width = config.head_hidden_size
        self.use_prompt = config.head_use_prompt
        self.prompt_token_dropout = config.prompt_token_dropout
        self.queries = nn.Parameter(torch.randn(config.num_query_tokens, width) * 0.02)
        self.safety_in = nn.Linear(config.safety_dim, width)
        # Token embeddings are small (LLaMA: std 0.02), so normalise them before projecting, or
        # the projection's bias swamps the token signal.
        self.prompt_in = (
            nn.Sequential(nn.LayerNorm(config.text_hidden_size), nn.Linear(config.text_hidden_size, width))
            if config.head_use_prompt
            else None
        )
        # Segment embeddings tell the head which keys are image-side and which are text-side.
        self.segment = nn.Parameter(torch.zeros(2, width))
        # A learned position per safety feature where their number is fixed; on bases whose images
        # give variable numbers of features ('mlp' there keeps them all) the head reads them as a set.
        self.safety_pos = (
            nn.Parameter(torch.zeros(config.num_safety_features, width)) if config.num_safety_features else None
        )
        self.norm_kv = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            [_CrossAttentionLayer(width, config.head_num_heads, config.dropout) for _ in range(config.head_num_layers)]
        )
        self.norm_out = nn.LayerNorm(width)
        # A masked mean of the keys beside the query summary: a direct path that trains fast,
        # while the attention layers add capacity.
        self.norm_pool = nn.LayerNorm(width)
        self.level_classifier = nn.Linear(width, config.num_levels)
        self.type_classifier = nn.Linear(width, config.num_types)
        # Temperature scaling: T = 1 until `safevlm calibrate` fits it; saved with the adapter.
        self.register_buffer("level_temperature", torch.ones(()))
        self.register_buffer("type_temperature", torch.ones(()))

    def _drop_prompt_tokens(self, prompt_mask: torch.Tensor, has_image: bool) -> torch.Tensor:
        """Training only: hide a random ``prompt_token_dropout`` share of each sample's prompt
        tokens (a sample without image features keeps at least the tokens it had when every one
        would be hidden)."""
        if not self.training or self.prompt_token_dropout <= 0.0:
            return prompt_mask
        kept = prompt_mask & (torch.rand(prompt_mask.shape, device=prompt_mask.device) >= self.prompt_token_dropout)
        if not has_image:
            emptied = ~kept.any(dim=1)
            kept[emptied] = prompt_mask[emptied]
        return kept

    def forward(
        self,
        safety_features: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        safety_mask: torch.Tensor | None = None,
    ) -> SafetyHeadOutput:
        """safety_features (B, M, Ds) with safety_mask (B, M), True at valid features (default:
        all; padding of images with fewer features is False); prompt_embeds (B, L, D) with
        prompt_mask (B, L), True for prompt tokens (False for padding and image placeholders)."""
        keys, masks = [], []
        if safety_features is not None:
            s = self.safety_in(safety_features) + self.segment[0]
            if self.safety_pos is not None:
                if safety_features.shape[1] != self.safety_pos.shape[0]:
                    raise ValueError(
                        f"the safety head was built for {self.safety_pos.shape[0]} safety features, "
                        f"got {safety_features.shape[1]}"
                    )
                s = s + self.safety_pos
            keys.append(s)
            if safety_mask is None:
                safety_mask = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
            masks.append(safety_mask.to(s.device).bool())
        if self.use_prompt and prompt_embeds is not None:
            if prompt_mask is None:
                prompt_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool, device=prompt_embeds.device)
            keys.append(self.prompt_in(prompt_embeds.to(self.prompt_in[1].weight.dtype)) + self.segment[1])
            masks.append(self._drop_prompt_tokens(prompt_mask.bool(), has_image=bool(masks)))
        if not keys:
            raise ValueError("the safety head needs safety features or a prompt; got neither")
        keys = self.norm_kv(torch.cat(keys, dim=1))
        key_mask = torch.cat(masks, dim=1)
        empty = ~key_mask.any(dim=1)
        if empty.any():
            raise ValueError(f"samples {empty.nonzero().flatten().tolist()} have nothing for the safety head to attend to")
        x = self.queries.unsqueeze(0).expand(keys.shape[0], -1, -1).to(keys.dtype)
        for layer in self.layers:
            x = layer(x, keys, key_mask)
        weights = key_mask.to(keys.dtype).unsqueeze(-1)
        key_mean = (keys * weights).sum(dim=1) / weights.sum(dim=1)
        safety_state = self.norm_out(x).mean(dim=1) + self.norm_pool(key_mean)
        level_logits = self.level_classifier(safety_state)
        type_logits = self.type_classifier(safety_state)
        return SafetyHeadOutput(
            level_logits=level_logits,
            type_logits=type_logits,
            level_probs=torch.softmax(level_logits.float() / self.level_temperature, dim=-1),
            type_probs=torch.softmax(type_logits.float() / self.type_temperature, dim=-1),
            safety_state=safety_state,
        )
