"""NaViT-style SigLIP vision tower of MiniCPM-V 2.6 (quantkit's own stand-in code).

Images of any aspect ratio arrive as patch rows: pixel_values [B, 3, patch, n_patches * patch] with each
slice's true grid in `tgt_sizes` [B, 2] (rows, cols) and the valid patches in `patch_attention_mask`
[B, 1, max_patches]. Position ids are bucketed onto the fixed (image_size / patch)^2 = 70 x 70 table, so a
grid of any size reuses the same learned positions (the same scheme vLLM's Idefics2 tower implements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, padding="valid")
        self.num_patches_per_side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, self.embed_dim)

    def position_ids(self, patch_attention_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """[B, max_patches] ids into the 70 x 70 table: each patch's fractional (row, col) bucketed."""
        batch, max_patches = patch_attention_mask.shape[0], patch_attention_mask.shape[-1]
        device = patch_attention_mask.device
        side = self.num_patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
        rows = tgt_sizes[:, 0].to(device).clamp(min=1).unsqueeze(1)
        cols = tgt_sizes[:, 1].to(device).clamp(min=1).unsqueeze(1)
        index = torch.arange(max_patches, device=device).unsqueeze(0).expand(batch, -1)
        bucket_h = torch.bucketize((index // cols) / rows, boundaries, right=True)
        bucket_w = torch.bucketize((index % cols) / cols, boundaries, right=True)
        ids = bucket_h * side + bucket_w
        return torch.where(patch_attention_mask.view(batch, -1), ids, torch.zeros_like(ids))

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor,
                tgt_sizes: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(device=weight.device, dtype=weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        return embeddings + self.position_embedding(self.position_ids(patch_attention_mask, tgt_sizes))


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), key_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    """`vpm` of MiniCPMV: embeddings -> pre-norm encoder layers -> post_layernorm."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor,
                tgt_sizes: torch.Tensor) -> BaseModelOutput:
        hidden_states = self.embeddings(pixel_values, patch_attention_mask, tgt_sizes)
        key_mask = patch_attention_mask.view(hidden_states.shape[0], -1).to(hidden_states.device)
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, key_mask)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden_states))
