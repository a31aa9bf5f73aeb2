"""Prefix safety tokens: a learned embedding table placed before the image embeddings.

Like torchtune's FusionEmbedding, this is an extra table beside the base model's embeddings;
the base's checkpoint keys are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from safevlm.config import SafetyConfig


class PrefixSafetyTokens(nn.Module):
    """P learned embeddings (P, D) and the logic to insert them into a batch."""

    def __init__(self, config: SafetyConfig, init_std: float = 0.02):
        super().__init__()
        self.num_tokens = config.num_prefix_tokens
        self.embeddings = nn.Parameter(torch.randn(config.num_prefix_tokens, config.text_hidden_size) * init_std)

    def insert(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        anchor: torch.LongTensor,
        labels: torch.LongTensor | None = None,
    ):
        """Insert the P tokens at position ``anchor[b]`` of each sample b.

        inputs_embeds (B, L, D), attention_mask (B, L), anchor (B,), labels (B, L) ->
        embeds (B, L+P, D), mask (B, L+P), labels (B, L+P) with -100 at the prefix.
        """
        p = self.num_tokens
        if p == 0:
            return inputs_embeds, attention_mask, labels
        b, length, _ = inputs_embeds.shape
        pos = torch.arange(length + p, device=inputs_embeds.device).unsqueeze(0).expand(b, -1)
        start = anchor.unsqueeze(1)
        in_prefix = (pos >= start) & (pos < start + p)
        src = torch.where(pos >= start + p, pos - p, pos).clamp(max=length - 1)  # source index in the old sequence
        prefix_index = (pos - start).clamp(0, p - 1)

        gathered = torch.gather(inputs_embeds, 1, src.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        prefix = self.embeddings.to(inputs_embeds.dtype)[prefix_index]
        embeds = torch.where(in_prefix.unsqueeze(-1), prefix, gathered)
        mask = torch.where(in_prefix, torch.ones_like(src), torch.gather(attention_mask.long(), 1, src))
        mask = mask.to(attention_mask.dtype)
        if labels is not None:
            labels = torch.where(in_prefix, torch.full_like(src, -100), torch.gather(labels, 1, src))
        return embeds, mask, labels
