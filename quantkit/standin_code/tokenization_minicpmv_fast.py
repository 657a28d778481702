"""MiniCPM-V 2.6 tokenizer (quantkit's own stand-in code): a Qwen2 byte-level BPE tokenizer that also names the
image-markup tokens, whose ids the processor and vLLM look up (`im_start_id`, `slice_start_id`, ...)."""

from __future__ import annotations

from transformers import Qwen2TokenizerFast


def _markup_id(token_attribute: str) -> property:
    """A read-only `<name>_id` property: the id of the markup token held in the class attribute `token_attribute`."""
    return property(lambda self: self.convert_tokens_to_ids(getattr(self, token_attribute)))


class MiniCPMVTokenizerFast(Qwen2TokenizerFast):
    im_start = "<image>"
    im_end = "</image>"
    ref_start = "<ref>"
    ref_end = "</ref>"
    box_start = "<box>"
    box_end = "</box>"
    quad_start = "<quad>"
    quad_end = "</quad>"
    point_start = "<point>"
    point_end = "</point>"
    slice_start = "<slice>"
    slice_end = "</slice>"
    im_id_start = "<image_id>"
    im_id_end = "</image_id>"

    @property
    def eos_id(self) -> int:
        return self.eos_token_id

    @property
    def bos_id(self) -> int:
        return self.bos_token_id

    @property
    def unk_id(self) -> int:
        return self.unk_token_id

    im_start_id = _markup_id("im_start")
    im_end_id = _markup_id("im_end")
    slice_start_id = _markup_id("slice_start")
    slice_end_id = _markup_id("slice_end")
    im_id_start_id = _markup_id("im_id_start")
    im_id_end_id = _markup_id("im_id_end")

    @property
    def newline_id(self) -> int:
        return self.convert_tokens_to_ids("\u010a")  # byte-level BPE spelling of "\n"
