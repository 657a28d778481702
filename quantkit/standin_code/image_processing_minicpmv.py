"""MiniCPM-V 2.6 image processor of the stand-in: the interface vLLM's MiniCPMV calls (remote code), over
quantkit's own slicing (quantkit.archs.minicpmv26.processing), so the stand-in and quantkit cannot drift apart.

An image becomes one downscaled overview plus, when it is larger than scale_resolution^2, a grid of
slices; each picture is laid out as one row of patches [3, patch, n_patches * patch] with its (rows, cols)
grid in `tgt_sizes`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from quantkit.archs.minicpmv26.processing import ImageSlicing


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

    @property
    def slicing(self) -> ImageSlicing:
        return ImageSlicing.from_dict({
            "max_slice_nums": self.max_slice_nums, "scale_resolution": self.scale_resolution,
            "patch_size": self.patch_size, "image_feature_size": self.image_feature_size,
            "use_image_id": self.use_image_id, "slice_mode": self.slice_mode, "norm_mean": self.norm_mean,
            "norm_std": self.norm_std, "im_start": self.im_start_token, "im_end": self.im_end_token,
            "slice_start": self.slice_start_token, "slice_end": self.slice_end_token, "unk": self.unk_token,
            "im_id_start": self.im_id_start, "im_id_end": self.im_id_end})

    def get_sliced_grid(self, image_size: tuple[int, int], max_slice_nums: int | None = None,
                        never_split: bool = False) -> list[int] | None:
        """[cols, rows] of slices for an image of (width, height), or None when it is not sliced."""
        grid = None if never_split else self.slicing.grid(image_size, max_slice_nums)
        return None if grid is None else list(grid)

    def get_slice_image_placeholder(self, image_size: tuple[int, int], image_idx: int = 0,
                                    max_slice_nums: int | None = None, use_image_id: bool | None = None) -> str:
        """The tokens that stand for one image in the prompt (what vLLM and the processor insert)."""
        return self.slicing.markup(image_size, image_idx, max_slice_nums, use_image_id)

    def preprocess(self, images, do_pad: bool = True, max_slice_nums: int | None = None,
                   return_tensors=None, **kwargs) -> BatchFeature:
        """images: one image, a list (one prompt) or a list per prompt (of images, or a frames array)."""
        if _is_one_image(images):
            images = [[images]]
        elif images and all(_is_one_image(image) for image in images):
            images = [list(images)]
        pixel_values, image_sizes, tgt_sizes = [], [], []
        slicing = self.slicing
        for prompt_images in images:
            values, sizes, grids = [], [], []
            for image in map(_to_pil, prompt_images):
                sizes.append(image.size)
                for picture in slicing.pictures(image.convert("RGB"), max_slice_nums):
                    values.append(slicing.patch_row(picture))
                    grids.append((picture.height // self.patch_size, picture.width // self.patch_size))
            pixel_values.append(values)
            image_sizes.append(sizes)
            tgt_sizes.append(torch.tensor(grids, dtype=torch.int32).reshape(-1, 2))
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes,
                                  "tgt_sizes": tgt_sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
