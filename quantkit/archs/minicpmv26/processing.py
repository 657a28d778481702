"""MiniCPM-V 2.6's input side in quantkit's own code: image slicing, pixel layout and the image-token markup,
read from preprocessor_config.json and tokenizer.json as data (no processor or tokenizer code of the
checkpoint is imported).

An image becomes a downscaled overview plus, when it is larger than scale_resolution^2, a grid of slices
(LLaVA-UHD slicing). Each picture is resized to a multiple of patch_size, normalised, and laid out as one row
of patches [3, patch, n_patches * patch] with its (rows, cols) grid in `tgt_sizes`. In the prompt each image
becomes `<image_id>i</image_id><image>` + image_feature_size x `<unk>` + `</image>`, then its slices'
`<slice>…</slice>` runs (rows joined by newlines); `image_bound` lists the `<unk>` runs the model overwrites.
The published processor computes the same (tests/integration/test_minicpmv26_published.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from quantkit.archs.minicpmv26 import IMAGE_PLACEHOLDER
from quantkit.errors import InputError


def _round_to_multiple(length: float, multiple: int) -> int:
    return max(round(length / multiple) * multiple, multiple)


@dataclass(frozen=True)
class ImageSlicing:
    """The geometry and markup settings of preprocessor_config.json (defaults: the published ones)."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    image_feature_size: int = 64
    use_image_id: bool = True
    slice_mode: bool = True
    norm_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    tokens: dict[str, str] = field(default_factory=lambda: {
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageSlicing:
        tokens = {key: values.get(key, default) for key, default in cls().tokens.items()}
        fields = {"max_slice_nums", "scale_resolution", "patch_size", "image_feature_size", "use_image_id",
                  "slice_mode"}
        kwargs: dict[str, Any] = {k: values[k] for k in fields if k in values}
        for key in ("norm_mean", "norm_std"):
            if key in values:
                kwargs[key] = tuple(values[key])
        return cls(**kwargs, tokens=tokens)

    def fit(self, size: tuple[float, float], allow_upscale: bool) -> tuple[int, int]:
        """(width, height) of about scale_resolution^2 pixels at the same aspect, multiples of patch_size."""
        width, height = size
        if width * height > self.scale_resolution**2 or allow_upscale:
            ratio = width / height
            height = int(self.scale_resolution / math.sqrt(ratio))
            width = int(height * ratio)
        return _round_to_multiple(width, self.patch_size), _round_to_multiple(height, self.patch_size)

    def grid(self, image_size: tuple[int, int], max_slice_nums: int | None = None) -> tuple[int, int] | None:
        """(cols, rows) of slices for an image of (width, height), or None when it is not sliced: the split
        into about area / scale_resolution^2 cells (±1) whose aspect is closest to the image's."""
        limit = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        width, height = image_size
        wanted = min(math.ceil(width * height / self.scale_resolution**2), limit)
        if wanted <= 1:
            return None
        log_ratio = math.log(width / height)
        best, best_error = (1, 1), float("inf")
        for count in (wanted - 1, wanted, wanted + 1):
            if count == 1 or count > limit:
                continue
            for cols in range(1, count + 1):
                if count % cols == 0:
                    error = abs(log_ratio - math.log(cols / (count // cols)))
                    if error < best_error:
                        best, best_error = (cols, count // cols), error
        return best

    def pictures(self, image: Image.Image, max_slice_nums: int | None = None) -> list[Image.Image]:
        """[overview, slices row by row] for one RGB image."""
        grid = self.grid(image.size, max_slice_nums) if self.slice_mode else None
        if grid is None:
            return [image.resize(self.fit(image.size, allow_upscale=True), Image.Resampling.BICUBIC)]
        overview = image.resize(self.fit(image.size, allow_upscale=False), Image.Resampling.BICUBIC)
        cols, rows = grid
        cell = self.fit((_round_to_multiple(image.width, cols) / cols,
                         _round_to_multiple(image.height, rows) / rows), allow_upscale=True)
        refined = image.resize((cell[0] * cols, cell[1] * rows), Image.Resampling.BICUBIC)
        slices = [refined.crop((c * cell[0], r * cell[1], (c + 1) * cell[0], (r + 1) * cell[1]))
                  for r in range(rows) for c in range(cols)]
        return [overview, *slices]

    def patch_row(self, picture: Image.Image) -> torch.Tensor:
        """RGB picture -> normalised [3, patch, n_patches * patch], patches in row-major order."""
        array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.norm_mean, dtype=np.float32)) / np.asarray(self.norm_std, dtype=np.float32)
        chw = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        p = self.patch_size
        patches = torch.nn.functional.unfold(chw.unsqueeze(0), (p, p), stride=(p, p))[0]  # [3*p*p, N]
        return patches.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)

    def markup(self, image_size: tuple[int, int], index: int, max_slice_nums: int | None = None,
               use_image_id: bool | None = None) -> str:
        """The tokens that stand for one image in the prompt."""
        t = self.tokens
        text = t["im_start"] + t["unk"] * self.image_feature_size + t["im_end"]
        if self.use_image_id if use_image_id is None else use_image_id:
            text = f"{t['im_id_start']}{index}{t['im_id_end']}" + text
        grid = self.grid(image_size, max_slice_nums) if self.slice_mode else None
        if grid is not None:
            cols, rows = grid
            one = t["slice_start"] + t["unk"] * self.image_feature_size + t["slice_end"]
            text += "\n".join(one * cols for _ in range(rows))
        return text


class MiniCPMV26Processor:
    """Chat turn + images -> the `data` dict MiniCPMV26.forward takes (one prompt, no padding)."""

    def __init__(self, tokenizer: Any, slicing: ImageSlicing) -> None:
        self.tokenizer = tokenizer
        self.slicing = slicing
        ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in slicing.tokens.items()}
        self.starts = torch.tensor([ids["im_start"], ids["slice_start"]])
        self.ends = torch.tensor([ids["im_end"], ids["slice_end"]])

    @classmethod
    def from_folder(cls, folder: Path) -> MiniCPMV26Processor:
        path = folder / "preprocessor_config.json"
        try:
            values = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as err:
            raise InputError(f"{path} is not valid JSON ({err}); re-download the model.") from err
        return cls(load_tokenizer(folder), ImageSlicing.from_dict(values))

    def chat_prompt(self, text: str, n_images: int) -> str:
        """One user turn with the image placeholders first, as the model's chat() lays them out."""
        content = "\n".join([IMAGE_PLACEHOLDER] * n_images + [text]) if n_images else text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompt: str, images: list[Image.Image]) -> dict[str, Any]:
        """input_ids [1, L], pixel_values [[pictures]], tgt_sizes [[n, 2]], image_bound [[n, 2]], position_ids."""
        chunks = prompt.split(IMAGE_PLACEHOLDER)
        if len(chunks) - 1 != len(images):
            raise InputError(f"prompt has {len(chunks) - 1} {IMAGE_PLACEHOLDER} but {len(images)} image(s) came")
        text, pictures, grids = chunks[0], [], []
        for index, (image, chunk) in enumerate(zip(images, chunks[1:], strict=True)):
            image = image.convert("RGB")
            text += self.slicing.markup(image.size, index) + chunk
            for picture in self.slicing.pictures(image):
                pictures.append(self.slicing.patch_row(picture))
                grids.append((picture.height // self.slicing.patch_size, picture.width // self.slicing.patch_size))
        ids = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        starts = torch.where(torch.isin(ids, self.starts))[0] + 1
        ends = torch.where(torch.isin(ids, self.ends))[0]
        return {
            "input_ids": ids.unsqueeze(0),
            "pixel_values": [pictures],
            "tgt_sizes": [torch.tensor(grids, dtype=torch.int32).reshape(-1, 2)],
            "image_bound": [torch.stack([starts, ends], dim=-1)],
            "position_ids": torch.arange(len(ids)).unsqueeze(0),
        }

    def __call__(self, text: str, images: list[Image.Image]) -> dict[str, Any]:
        """Keyword arguments for `MiniCPMV26(**kwargs)`: one user turn with `images`, ready for generation."""
        return {"data": self.encode(self.chat_prompt(text, len(images)), images)}


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer from tokenizer.json and its JSON side files, without its tokenizer class
    (MiniCPMVTokenizerFast is remote code; it only adds names for token ids that we look up ourselves)."""
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder / 'tokenizer.json'} is missing; quantkit reads MiniCPM-V's tokenizer from it.")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
