"""MiniCPM-V 2.6 processor (quantkit's own stand-in code): image processor + tokenizer behind one call.

Each `(<image>./</image>)` in a prompt is replaced by that image's placeholder tokens; `image_bound` lists,
per prompt, the [start, end) token ranges of the `<unk>` runs that the model overwrites with the resampler's
64 embeddings per picture (overview and slices alike).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_PATTERN = "(<image>./</image>)"


class MiniCPMVProcessor(ProcessorMixin):
    attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text, images=None, max_length: int | None = None, do_pad: bool = True,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None,
                 return_tensors=None, **kwargs) -> BatchFeature:
        """text: str or list[str]; images: None, a list per prompt, or a flat list when there is one prompt."""
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [[] for _ in texts]
        image_inputs = self.image_processor(images, do_pad=do_pad, max_slice_nums=max_slice_nums)
        if len(image_inputs["image_sizes"]) != len(texts):
            raise ValueError(f"{len(texts)} prompts but images for {len(image_inputs['image_sizes'])}")

        ids_list, bounds_list = [], []
        for prompt, sizes in zip(texts, image_inputs["image_sizes"], strict=True):
            chunks = prompt.split(IMAGE_PATTERN)
            if len(chunks) - 1 != len(sizes):
                raise ValueError(f"prompt has {len(chunks) - 1} {IMAGE_PATTERN} but {len(sizes)} images")
            expanded = chunks[0]
            for index, (size, chunk) in enumerate(zip(sizes, chunks[1:], strict=True)):
                expanded += self.image_processor.get_slice_image_placeholder(
                    size, index, max_slice_nums, use_image_id) + chunk
            ids, bounds = self._encode(expanded, max_length)
            ids_list.append(ids)
            bounds_list.append(bounds)

        longest = max(len(ids) for ids in ids_list)
        input_ids = torch.zeros(len(ids_list), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(ids_list), longest, dtype=torch.long)
        for row, (ids, bounds) in enumerate(zip(ids_list, bounds_list, strict=True)):
            pad = longest - len(ids)  # left padding, as the real processor
            input_ids[row, pad:] = ids
            attention_mask[row, pad:] = 1
            bounds_list[row] = bounds + pad
        return BatchFeature(data={
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": image_inputs["pixel_values"],
            "image_sizes": image_inputs["image_sizes"],
            "image_bound": bounds_list,
            "tgt_sizes": image_inputs["tgt_sizes"],
        })

    def _encode(self, text: str, max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        if max_length is not None:
            ids = ids[:max_length]
        tok = self.tokenizer
        starts = torch.where((ids == tok.im_start_id) | (ids == tok.slice_start_id))[0] + 1
        ends = torch.where((ids == tok.im_end_id) | (ids == tok.slice_end_id))[0]
        if len(starts) != len(ends):
            raise ValueError("unbalanced image markup (truncated by max_length?)")
        return ids, torch.stack([starts, ends], dim=-1).reshape(-1, 2)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
