"""MiniCPM-V 2.6 model (quantkit's own stand-in code, same module tree and `forward(data)` as the real one).

`vpm` (NaViT SigLIP) encodes every picture (overview + slices), `resampler` turns each into query_num
LLM-width embeddings, and those overwrite the prompt's `<unk>` runs listed in `image_bound` before `llm`
(a transformers Qwen2ForCausalLM) runs on the embeddings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_minicpm import MiniCPMVConfig
from .modeling_navit_siglip import SiglipVisionTransformer
from .resampler import Resampler


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "llm"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Random init for weights a checkpoint lacks; recomputes the resampler's position table."""
        std = self.config.initializer_range
        if isinstance(module, Resampler):
            torch.nn.init.trunc_normal_(module.query, std=std)
            module.reset_pos_embed()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=std)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)


class MiniCPMV(MiniCPMVPreTrainedModel):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.vpm = SiglipVisionTransformer(config.vision_config)
        if config.drop_vision_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        self.vision_dim = config.vision_config.hidden_size
        self.embed_dim = config.hidden_size
        self.resampler = Resampler(num_queries=config.query_num, embed_dim=self.embed_dim,
                                   num_heads=self.embed_dim // 128, kv_dim=self.vision_dim)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.llm.lm_head

    def set_output_embeddings(self, new_embeddings: torch.nn.Module) -> None:
        self.llm.lm_head = new_embeddings

    def get_vision_embedding(self, pixel_values: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Pictures [3, patch, n * patch] with grids [n_pictures, 2] -> [n_pictures, query_num, hidden]."""
        dtype, device = self.vpm.embeddings.patch_embedding.weight.dtype, self.device
        tgt_sizes = tgt_sizes.to(device=device, dtype=torch.long)
        outputs = []
        step = self.config.vision_batch_size if self.config.batch_vision_input else 1
        for first in range(0, len(pixel_values), step):
            chunk, grids = pixel_values[first: first + step], tgt_sizes[first: first + step]
            patch, longest = chunk[0].shape[1], max(p.shape[-1] for p in chunk)
            batch = torch.zeros(len(chunk), 3, patch, longest, dtype=dtype, device=device)
            for i, picture in enumerate(chunk):
                batch[i, ..., : picture.shape[-1]] = picture.to(device=device, dtype=dtype)
            n_patches = grids[:, 0] * grids[:, 1]
            mask = torch.arange(int(n_patches.max()), device=device)[None, :] < n_patches[:, None]
            hidden = self.vpm(batch, patch_attention_mask=mask.unsqueeze(1), tgt_sizes=grids).last_hidden_state
            outputs.append(self.resampler(hidden, grids))
        return torch.cat(outputs)

    def get_vllm_embedding(self, data: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(input embeddings [B, L, hidden] with image slots filled, per-prompt vision embeddings)."""
        input_ids = data["input_ids"]
        embeds = self.llm.get_input_embeddings()(input_ids)
        vision_hidden_states = data.get("vision_hidden_states")
        if vision_hidden_states is None:
            per_prompt = [list(p) for p in data.get("pixel_values") or [[] for _ in range(len(input_ids))]]
            counts = [len(p) for p in per_prompt]
            flat = [picture for prompt in per_prompt for picture in prompt]
            if flat:
                grids = torch.cat([torch.as_tensor(g).reshape(-1, 2) for g in data["tgt_sizes"] if len(g)])
                vision = self.get_vision_embedding(flat, grids).to(embeds.dtype)
                vision_hidden_states = list(torch.split(vision, counts))
            else:
                vision_hidden_states = [embeds.new_zeros(0, self.config.query_num, self.embed_dim)] * len(counts)

        bounds = data.get("image_bound") or [[] for _ in range(len(input_ids))]
        rows = []
        for row, (row_embeds, row_vision, row_bounds) in enumerate(zip(embeds, vision_hidden_states, bounds,
                                                                         strict=True)):
            row_bounds = torch.as_tensor(row_bounds, dtype=torch.long).reshape(-1, 2)
            if len(row_bounds) != len(row_vision):
                raise ValueError(f"prompt {row}: {len(row_bounds)} image slots but {len(row_vision)} pictures")
            if len(row_bounds):
                index = torch.cat([torch.arange(s, e) for s, e in row_bounds.tolist()]).to(row_embeds.device)
                row_embeds = row_embeds.index_copy(0, index, row_vision.reshape(-1, self.embed_dim))
            rows.append(row_embeds)
        return torch.stack(rows), vision_hidden_states

    def forward(self, data: dict, **kwargs):
        """data: input_ids [B, L], pixel_values (list per prompt of [3, patch, n*patch] tensors), tgt_sizes,
        image_bound, position_ids [B, L]; kwargs go to the LLM (attention_mask, labels, ...)."""
        inputs_embeds, _ = self.get_vllm_embedding(data)
        position_ids = data.get("position_ids")
        if position_ids is not None and position_ids.dtype != torch.long:
            position_ids = position_ids.long()
        return self.llm(input_ids=None, inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)
