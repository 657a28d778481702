"""Perceiver resampler of MiniCPM-V 2.6 (quantkit's own stand-in code): `query_num` learned queries attend once
over a slice's vision tokens (plus a 2D sin-cos position table) and come out as LLM-width embeddings."""

from __future__ import annotations

import torch
from torch import nn


def sincos_table_2d(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols, embed_dim] float32: first half encodes the column, second half the row (MAE layout)."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].to(torch.float64) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([encode(col_idx), encode(row_idx)], dim=-1).to(torch.float32)


class Resampler(nn.Module):
    """x [B, L, kv_dim] with grids tgt_sizes [B, 2] -> [B, num_queries, embed_dim]."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int,
                 max_size: tuple[int, int] = (70, 70)) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.max_size = max_size
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self.register_buffer("pos_embed", sincos_table_2d(embed_dim, *max_size), persistent=False)

    def reset_pos_embed(self) -> None:
        """Recompute the (non-persistent) table, e.g. after a meta-device init skipped it."""
        self.pos_embed = sincos_table_2d(self.embed_dim, *self.max_size).to(self.query.device)

    def _grow_pos_embed(self, tgt_sizes: torch.Tensor) -> None:
        rows, cols = int(tgt_sizes[:, 0].max()), int(tgt_sizes[:, 1].max())
        if rows > self.max_size[0] or cols > self.max_size[1]:
            self.max_size = (max(rows, self.max_size[0]), max(cols, self.max_size[1]))
            self.reset_pos_embed()

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        self._grow_pos_embed(tgt_sizes)
        patch_len = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(x.device)
        key_padding_mask = torch.arange(length, device=x.device)[None, :] >= patch_len[:, None]
        pos = torch.zeros(batch, length, self.embed_dim, dtype=x.dtype, device=x.device)
        for i, (rows, cols) in enumerate(tgt_sizes.tolist()):
            pos[i, : rows * cols] = self.pos_embed[:rows, :cols].reshape(rows * cols, -1).to(x.dtype)

        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # L, B, D
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)  # Q, B, D
        out = self.attn(q, kv + pos.permute(1, 0, 2), kv, key_padding_mask=key_padding_mask)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj

