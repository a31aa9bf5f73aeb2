"""Prefix safety tokens: a learned embedding table placed before the image embeddings.

Like torchtune's FusionEmbedding, this is an extra table beside the base model's embeddings;
the base's checkpoint keys are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from safevlm.config import SafetyConfig


class PrefixSafetyTokens(nn.Module):
    """P learned embeddings (P, D) and the logic to insert them into a batch.

    With ``prefix_conditioning="head"`` every prefix token also gets ``condition(safety_state)``, a
    projection of the safety head's state (B, W) -> (B, D), so the LLM can condition on
    this input's risk; with ``"decision"`` the projection reads the head's decision, a level
    and a type, one-hot side by side (B, num_levels + num_types) (see
    :meth:`safevlm.model.SafeVLM.prefix_state`). The projection starts at zero: an untrained
    model behaves exactly like static prefix tokens.
    """

    def __init__(self, config: SafetyConfig, init_std: float = 0.02):
        super().__init__()
        self.num_tokens = config.num_prefix_tokens
        self.embeddings = nn.Parameter(torch.randn(config.num_prefix_tokens, config.text_hidden_size) * init_std)
        self.condition = None
        if config.prefix_conditioning != "none" and config.num_prefix_tokens > 0:
            width = config.head_hidden_size if config.prefix_conditioning == "head" else config.num_levels + config.num_types
            self.condition = nn.Linear(width, config.text_hidden_size)
            nn.init.zeros_(self.condition.weight)
            nn.init.zeros_(self.condition.bias)

    @property
    def conditioned(self) -> bool:
        return self.condition is not None

    def _layout(self, anchor: torch.LongTensor, length: int, device):
        """(in_prefix (B, L+P) bool, source index in the old sequence (B, L+P), prefix index (B, L+P))."""
        p = self.num_tokens
        pos = torch.arange(length + p, device=device).unsqueeze(0).expand(anchor.shape[0], -1)
        start = anchor.to(device).unsqueeze(1)
        in_prefix = (pos >= start) & (pos < start + p)
        src = torch.where(pos >= start + p, pos - p, pos).clamp(max=length - 1)
        prefix_index = (pos - start).clamp(0, p - 1)
        return in_prefix, src, prefix_index

    def insert_ids(self, input_ids: torch.LongTensor, anchor: torch.LongTensor, fill: int) -> torch.LongTensor:
        """``input_ids`` (B, L) laid out as :meth:`insert` lays out the embeddings: (B, L+P)
        with ``fill`` at the prefix positions (what a backbone reads to place positions)."""
        if self.num_tokens == 0:
            return input_ids
        in_prefix, src, _ = self._layout(anchor, input_ids.shape[1], input_ids.device)
        return torch.where(in_prefix, torch.full_like(src, fill), torch.gather(input_ids, 1, src))

    def insert(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        anchor: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        safety_state: torch.Tensor | None = None,
    ):
        """Insert the P tokens at position ``anchor[b]`` of each sample b.

        inputs_embeds (B, L, D), attention_mask (B, L), anchor (B,), labels (B, L),
        safety_state (B, W) the state that conditions the tokens (needed when conditioned:
        :meth:`safevlm.model.SafeVLM.prefix_state`) ->
        embeds (B, L+P, D), mask (B, L+P), labels (B, L+P) with -100 at the prefix.
        """
        p = self.num_tokens
        if p == 0:
            return inputs_embeds, attention_mask, labels
        in_prefix, src, prefix_index = self._layout(anchor, inputs_embeds.shape[1], inputs_embeds.device)

        gathered = torch.gather(inputs_embeds, 1, src.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        prefix = self.embeddings.to(inputs_embeds.dtype)[prefix_index]
        if self.condition is not None:
            if safety_state is None:
                raise ValueError("conditioned prefix tokens need the safety head's state (SafeVLM.prefix_state)")
            prefix = prefix + self.condition(safety_state.to(self.condition.weight.dtype)).to(prefix.dtype).unsqueeze(1)
        embeds = torch.where(in_prefix.unsqueeze(-1), prefix, gathered)
        mask = torch.where(in_prefix, torch.ones_like(src), torch.gather(attention_mask.long(), 1, src))
        mask = mask.to(attention_mask.dtype)
        if labels is not None:
            labels = torch.where(in_prefix, torch.full_like(src, -100), torch.gather(labels, 1, src))
        return embeds, mask, labels
