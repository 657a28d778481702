"""MiniCPM-V 2.6's module tree, built by quantkit from config.json alone (no checkpoint code is imported).

`llm` is transformers' native Qwen2ForCausalLM made from the config's top-level keys; `vpm` (a NaViT SigLIP
tower) and `resampler` (a perceiver with 2D sin-cos positions) are quantkit's own, with the real checkpoint's
parameter names, so every tensor of a MiniCPM-V 2.6 snapshot loads by name. The computation follows the
published model (tests/integration/test_minicpmv26_published.py compares the two on the same weights).
Images arrive as the processor's pictures: each [3, patch, n_patches * patch] with its (rows, cols) grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Keys of config.json that describe the vision side or the checkpoint, not the Qwen2 LLM.
NON_LLM_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "quantization_config",
    "vision_config", "slice_config", "slice_mode", "query_num", "image_size", "patch_size", "scale_resolution",
    "use_image_id", "vision_batch_size", "batch_vision_input", "drop_vision_last_layer", "version", "torch_dtype",
    "dtype",
})
# The vision tower of openbmb/MiniCPM-V-2_6 where config.json leaves a key out (the published defaults).
VISION_DEFAULTS = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "num_attention_heads": 16,
                   "num_hidden_layers": 27, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6,
                   "hidden_act": "gelu_pytorch_tanh"}
RESAMPLER_HEAD_WIDTH = 128
RESAMPLER_MAX_GRID = (70, 70)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    image_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VisionConfig:
        given = config.get("vision_config") or {}
        return cls(**{key: given.get(key, default) for key, default in VISION_DEFAULTS.items()})


def llm_config(config: dict[str, Any]) -> Any:
    """The Qwen2 config of `llm`: MiniCPM-V 2.6 keeps the LLM's keys at the top level of config.json."""
    from transformers import Qwen2Config

    return Qwen2Config(**{k: v for k, v in config.items() if k not in NON_LLM_KEYS}, attn_implementation="sdpa")


class VisionEmbeddings(nn.Module):
    """Patch embedding plus learned positions on a fixed side x side table: a grid of any size is mapped onto
    it by bucketing each patch's fractional (row, col), so every aspect ratio reuses the same positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, padding="valid")
        self.side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)

    def position_ids(self, tgt_sizes: torch.Tensor, max_patches: int) -> torch.Tensor:
        # Fractional coordinates as float32 aranges of step float32(1 / n), as the published tower computes
        # them: a patch lying on a bucket boundary must land in the same bucket, or it gets another embedding.
        boundaries = torch.arange(1 / self.side, 1.0, 1 / self.side)
        ids = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
        for row, (rows, cols) in enumerate(tgt_sizes.tolist()):
            steps = [(1 / torch.tensor(n, dtype=torch.float32)).item() for n in (rows, cols)]
            bucket_h = torch.bucketize(torch.arange(0, 1 - 1e-6, steps[0]), boundaries, right=True)
            bucket_w = torch.bucketize(torch.arange(0, 1 - 1e-6, steps[1]), boundaries, right=True)
            ids[row, : rows * cols] = (bucket_h[:, None] * self.side + bucket_w).flatten()
        return ids

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, max_patches, hidden]
        ids = self.position_ids(tgt_sizes, patches.shape[1]).to(patches.device)
        return patches + self.position_embedding(ids)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q_proj(hidden)), heads(self.k_proj(hidden)),
                                             heads(self.v_proj(hidden)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.activation = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), key_mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(num_layers))


class NavitSiglip(nn.Module):
    """`vpm`: embeddings -> pre-norm encoder layers -> post_layernorm, over padded rows of patches."""

    def __init__(self, config: VisionConfig, drop_last_layer: bool) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config, config.num_hidden_layers - int(drop_last_layer))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values, tgt_sizes)
        n_patches = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(hidden.device)
        key_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < n_patches[:, None]
        mask = None if bool(key_mask.all()) else key_mask
        for layer in self.encoder.layers:
            hidden = layer(hidden, mask)
        return self.post_layernorm(hidden)


def sincos_table_2d(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols, embed_dim] float32: the first half encodes the column, the second half the row, each as
    [sin, cos] of position x 10000^(-i / (embed_dim / 4))."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].to(torch.float64) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([encode(col_idx), encode(row_idx)], dim=-1).to(torch.float32)


class Resampler(nn.Module):
    """`resampler`: query_num learned queries attend once over a picture's vision tokens (plus 2D positions)
    and come out as LLM-width embeddings, [B, L, kv_dim] -> [B, num_queries, embed_dim]."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // RESAMPLER_HEAD_WIDTH)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self._positions: torch.Tensor | None = None  # not a checkpoint tensor: computed on first use

    def positions(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """[rows * cols, embed_dim] float32 on `device`; the table grows past 70 x 70 when a grid needs it."""
        table = self._positions
        if table is None or table.device != device or table.shape[0] < rows or table.shape[1] < cols:
            grid = (max(rows, RESAMPLER_MAX_GRID[0]), max(cols, RESAMPLER_MAX_GRID[1]))
            table = self._positions = sincos_table_2d(self.embed_dim, *grid).to(device)
        return table[:rows, :cols].reshape(rows * cols, -1)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        patch_len = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(x.device)
        key_padding_mask = torch.arange(length, device=x.device)[None, :] >= patch_len[:, None]
        pos = x.new_zeros(batch, length, self.embed_dim)
        for i, (rows, cols) in enumerate(tgt_sizes.tolist()):
            pos[i, : rows * cols] = self.positions(rows, cols, x.device).to(x.dtype)
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # L, B, D
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)  # Q, B, D
        out = self.attn(q, kv + pos.permute(1, 0, 2), kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


class MiniCPMV26(nn.Module):
    """llm + vpm + resampler; `forward(data)` takes the processor's output as the published model does."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM

        vision = VisionConfig.from_config(config)
        self.llm = Qwen2ForCausalLM(llm_config(config))
        self.config = self.llm.config  # as the published MiniCPMVConfig, a Qwen2 config
        # The published model drops the tower's last layer unless config.json says otherwise (2.6 says false).
        self.vpm = NavitSiglip(vision, drop_last_layer=bool(config.get("drop_vision_last_layer", True)))
        self.resampler = Resampler(config.get("query_num", 64), self.llm.config.hidden_size, vision.hidden_size)
        self.vision_batch_size = int(config.get("vision_batch_size", 16))

    def vision_embeddings(self, pictures: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Pictures [3, patch, n * patch] with grids [n_pictures, 2] -> [n_pictures, query_num, hidden]."""
        weight = self.vpm.embeddings.patch_embedding.weight
        outputs = []
        for first in range(0, len(pictures), self.vision_batch_size):
            chunk = pictures[first: first + self.vision_batch_size]
            grids = tgt_sizes[first: first + self.vision_batch_size]
            longest = max(p.shape[-1] for p in chunk)
            batch = weight.new_zeros(len(chunk), chunk[0].shape[0], chunk[0].shape[1], longest)
            for i, picture in enumerate(chunk):
                batch[i, ..., : picture.shape[-1]] = picture
            outputs.append(self.resampler(self.vpm(batch, grids), grids))
        return torch.cat(outputs)

    def embed(self, data: dict[str, Any]) -> torch.Tensor:
        """Token embeddings [B, L, hidden] with each `image_bound` range overwritten by one picture's queries."""
        input_ids = data["input_ids"]
        embeds = self.llm.get_input_embeddings()(input_ids)
        per_prompt = [list(p) for p in data.get("pixel_values") or [[] for _ in range(len(input_ids))]]
        pictures = [p for prompt in per_prompt for p in prompt]
        if not pictures:
            return embeds
        grids = torch.cat([torch.as_tensor(g).reshape(-1, 2) for g in data["tgt_sizes"] if len(g)]).long()
        vision = self.vision_embeddings(pictures, grids).to(embeds.dtype)
        rows, start = [], 0
        for row_embeds, prompt, bounds in zip(embeds, per_prompt, data["image_bound"], strict=True):
            bounds = torch.as_tensor(bounds, dtype=torch.long).reshape(-1, 2)
            if len(bounds) != len(prompt):
                raise ValueError(f"{len(bounds)} image slots in the prompt but {len(prompt)} pictures")
            if len(prompt):
                index = torch.cat([torch.arange(s, e) for s, e in bounds.tolist()]).to(row_embeds.device)
                queries = vision[start: start + len(prompt)].reshape(-1, embeds.shape[-1])
                row_embeds = row_embeds.index_copy(0, index, queries)
                start += len(prompt)
            rows.append(row_embeds)
        return torch.stack(rows)

    def forward(self, data: dict[str, Any], **llm_kwargs: Any) -> Any:
        position_ids = data.get("position_ids")
        if position_ids is not None:
            position_ids = position_ids.long()
        return self.llm(input_ids=None, inputs_embeds=self.embed(data), position_ids=position_ids, **llm_kwargs)

    def rebuild_buffers(self) -> None:
        """Recompute the tensors a checkpoint does not hold (the LLM's rotary frequencies) after a meta-device
        build, on the device of the loaded weights."""
        rotary = self.llm.model.rotary_emb
        device = self.llm.get_input_embeddings().weight.device
        self.llm.model.rotary_emb = type(rotary)(self.llm.config).to(device)
