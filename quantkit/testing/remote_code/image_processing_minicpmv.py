"""MiniCPM-V 2.6 image processor (quantkit's own stand-in code, the interface vLLM's MiniCPMV calls).

An image becomes one downscaled overview plus, when it is larger than scale_resolution^2, a grid of
slices (LLaVA-UHD slicing). Each picture is resized to a multiple of patch_size, normalised, and laid out
as one row of patches: [3, patch, n_patches * patch]; `tgt_sizes` holds each picture's (rows, cols) grid.
In the prompt each picture is `<image>`/`<slice>` + image_feature_size x `<unk>` + `</image>`/`</slice>`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs


def _round_to_multiple(length: float, multiple: int) -> int:
    return max(round(length / multiple) * multiple, multiple)


def _to_pil(image) -> Image.Image:
    """PIL images pass through; HWC uint8 arrays or tensors (e.g. vLLM's video frames) are wrapped."""
    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (array * 255).round().clip(0, 255).astype(np.uint8) if array.max() <= 1.0 else array.astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def _is_one_image(item) -> bool:
    """A PIL image or an HWC/CHW array; a 4-D array is a list of frames (vLLM passes videos that way)."""
    return isinstance(item, Image.Image) or (hasattr(item, "ndim") and item.ndim <= 3)


class MiniCPMVImagesKwargs(ImagesKwargs, total=False):
    """Call/from_pretrained options this processor accepts (vLLM passes max_slice_nums for video frames)."""

    max_slice_nums: int
    scale_resolution: int
    image_feature_size: int
    use_image_id: bool
    slice_mode: bool


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    valid_kwargs = MiniCPMVImagesKwargs

    def __init__(self, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14,
                 image_feature_size: int = 64, use_image_id: bool = True, slice_mode: bool = True,
                 norm_mean: list[float] | None = None, norm_std: list[float] | None = None,
                 im_start: str = "<image>", im_end: str = "</image>", slice_start: str = "<slice>",
                 slice_end: str = "</slice>", unk: str = "<unk>", im_id_start: str = "<image_id>",
                 im_id_end: str = "</image_id>", version: float = 2.6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.use_image_id = use_image_id
        self.slice_mode = slice_mode
        self.norm_mean = list(norm_mean or [0.5, 0.5, 0.5])
        self.norm_std = list(norm_std or [0.5, 0.5, 0.5])
        self.im_start_token, self.im_end_token = im_start, im_end
        self.slice_start_token, self.slice_end_token = slice_start, slice_end
        self.unk_token = unk
        self.im_id_start, self.im_id_end = im_id_start, im_id_end
        self.version = version

    # --- geometry -----------------------------------------------------------------------------------
    def _fit_resolution(self, size: tuple[float, float], allow_upscale: bool) -> tuple[int, int]:
        """Keep the aspect ratio, scale to about scale_resolution^2 pixels (down only unless allowed)."""
        width, height = size
        if width * height > self.scale_resolution**2 or allow_upscale:
            ratio = width / height
            height = int(self.scale_resolution / math.sqrt(ratio))
            width = int(height * ratio)
        return _round_to_multiple(width, self.patch_size), _round_to_multiple(height, self.patch_size)

    def get_sliced_grid(self, image_size: tuple[int, int], max_slice_nums: int | None = None,
                        never_split: bool = False) -> list[int] | None:
        """(cols, rows) of slices for an image of (width, height), or None when it is not sliced."""
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        width, height = image_size
        wanted = min(math.ceil(width * height / self.scale_resolution**2), max_slice_nums)
        if wanted <= 1 or never_split:
            return None
        log_ratio = math.log(width / height)
        best, best_error = [1, 1], float("inf")
        for count in (wanted - 1, wanted, wanted + 1):
            if count == 1 or count > max_slice_nums:
                continue
            for cols in range(1, count + 1):
                if count % cols:
                    continue
                error = abs(log_ratio - math.log(cols / (count // cols)))
                if error < best_error:
                    best, best_error = [cols, count // cols], error
        return best

    def slice_image(self, image: Image.Image, max_slice_nums: int | None = None) -> list[Image.Image]:
        """[overview, slices row by row]."""
        grid = self.get_sliced_grid(image.size, max_slice_nums)
        if grid is None:
            return [image.resize(self._fit_resolution(image.size, allow_upscale=True), Image.Resampling.BICUBIC)]
        overview = image.resize(self._fit_resolution(image.size, allow_upscale=False), Image.Resampling.BICUBIC)
        cols, rows = grid
        cell = self._fit_resolution((_round_to_multiple(image.width, cols) / cols,
                                     _round_to_multiple(image.height, rows) / rows), allow_upscale=True)
        refined = image.resize((cell[0] * cols, cell[1] * rows), Image.Resampling.BICUBIC)
        slices = [refined.crop((c * cell[0], r * cell[1], (c + 1) * cell[0], (r + 1) * cell[1]))
                  for r in range(rows) for c in range(cols)]
        return [overview, *slices]

    # --- prompt text ----------------------------------------------------------------------------------
    def get_grid_placeholder(self, grid: list[int] | None) -> str:
        if grid is None:
            return ""
        one = self.slice_start_token + self.unk_token * self.image_feature_size + self.slice_end_token
        cols, rows = grid
        return "\n".join(one * cols for _ in range(rows))

    def get_image_id_placeholder(self, idx: int = 0) -> str:
        return f"{self.im_id_start}{idx}{self.im_id_end}"

    def get_slice_image_placeholder(self, image_size: tuple[int, int], image_idx: int = 0,
                                    max_slice_nums: int | None = None, use_image_id: bool | None = None) -> str:
        """The tokens that stand for one image in the prompt (what vLLM and the processor insert)."""
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        grid = self.get_sliced_grid(image_size, max_slice_nums)
        text = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        if use_image_id:
            text = self.get_image_id_placeholder(image_idx) + text
        if self.slice_mode:
            text += self.get_grid_placeholder(grid)
        return text

    # --- pixels ---------------------------------------------------------------------------------------
    def to_patch_row(self, image: Image.Image) -> torch.Tensor:
        """RGB picture -> normalised [3, patch, n_patches * patch], patches in row-major order."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.norm_mean, dtype=np.float32)) / np.asarray(self.norm_std, dtype=np.float32)
        chw = torch.from_numpy(array).permute(2, 0, 1)
        p = self.patch_size
        patches = torch.nn.functional.unfold(chw.unsqueeze(0), (p, p), stride=(p, p))[0]  # [3*p*p, N]
        return patches.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)

    def preprocess(self, images, do_pad: bool = True, max_slice_nums: int | None = None,
                   return_tensors=None, **kwargs) -> BatchFeature:
        """images: one image, a list (one prompt) or a list per prompt (of images, or a frames array)."""
        if _is_one_image(images):
            images = [[images]]
        elif images and all(_is_one_image(image) for image in images):
            images = [list(images)]
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for prompt_images in images:
            values, sizes, grids = [], [], []
            for image in map(_to_pil, prompt_images):
                sizes.append(image.size)
                for picture in self.slice_image(image, max_slice_nums):
                    values.append(self.to_patch_row(picture))
                    grids.append((picture.height // self.patch_size, picture.width // self.patch_size))
            pixel_values.append(values)
            image_sizes.append(sizes)
            tgt_sizes.append(torch.tensor(grids, dtype=torch.int32).reshape(-1, 2))
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes,
                                  "tgt_sizes": tgt_sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
