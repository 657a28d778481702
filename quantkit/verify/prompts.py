"""The prompt suite verify runs through both variants: the default one shipped in quantkit/verify/suite/, or a
user's jsonl file (one object per line: {"id", "kind", "text", "images": [paths]}; image paths relative to the
file's folder)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.archs import ArchSpec
from quantkit.errors import InputError

DEFAULT_SUITE = Path(__file__).parent / "suite" / "prompts.jsonl"

KINDS = {
    "text": (0, 0),
    "image": (1, 1),
    "multi_image": (2, None),
    "video": (2, None),
}
"""kind -> (min, max) number of images; a video is its sampled frames, one placeholder per frame."""


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    text: str
    images: tuple[str, ...] = ()
    """Absolute paths of the images (or video frames, in order)."""

    def user_content(self, image_placeholder: str | None, video_placeholder: str | None = None) -> str:
        """The user turn: one line of the architecture's `image_placeholder` per image, then the question. A video
        is one `video_placeholder` line where the architecture has one (`sent_as_video`), else its frames as
        images."""
        if self.sent_as_video(video_placeholder):
            return f"{video_placeholder}\n{self.text}"
        if self.images and image_placeholder is None:
            raise InputError(f"prompt {self.id!r} has images but the model takes none")
        return "\n".join([*[image_placeholder] * len(self.images), self.text])

    def sent_as_video(self, video_placeholder: str | None) -> bool:
        return self.kind == "video" and video_placeholder is not None

    def as_dict(self) -> dict:
        return asdict(self)


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read and validate a prompt suite (default: the shipped one). Errors name the file and line."""
    path = Path(path) if path is not None else DEFAULT_SUITE
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file (a jsonl of {{id, kind, text, images}} objects).")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err}).") from err
        prompts.append(_parse(record, path.parent, where))
        if prompts[-1].id in seen:
            raise InputError(f"{where}: prompt id {prompts[-1].id!r} is used twice; ids must be unique.")
        seen.add(prompts[-1].id)
    if not prompts:
        raise InputError(f"{path}: no prompts in the file.")
    return prompts


def prompts_for(spec: ArchSpec, prompts: list[Prompt], user_suite: bool) -> list[Prompt]:
    """The prompts of kinds `spec` takes. From the shipped suite the others are left out; a user's suite with
    kinds the model cannot take is refused (the user asked for them)."""
    unsupported = sorted({p.kind for p in prompts} - set(spec.prompt_kinds))
    if unsupported and user_suite:
        raise InputError(f"--prompts: {spec.card.display_name} takes {', '.join(spec.prompt_kinds)} prompts, not "
                         f"{', '.join(unsupported)}; remove those lines.")
    return [p for p in prompts if p.kind in spec.prompt_kinds]


def _parse(record: object, base: Path, where: str) -> Prompt:
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not isinstance(
            record.get("text"), str):
        raise InputError(f"{where}: each line needs a string `id` and `text` (and `kind`, `images`).")
    kind = record.get("kind", "text")
    if kind not in KINDS:
        raise InputError(f"{where}: kind {kind!r} is not one of {sorted(KINDS)}.")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InputError(f"{where}: `images` must be a list of file paths.")
    low, high = KINDS[kind]
    if len(images) < low or (high is not None and len(images) > high):
        wanted = f"{low}" if low == high else f"at least {low}"
        raise InputError(f"{where}: a {kind!r} prompt needs {wanted} image(s), got {len(images)}.")
    resolved = tuple(str((base / p).resolve()) for p in images)
    missing = [p for p in resolved if not Path(p).is_file()]
    if missing:
        raise InputError(f"{where}: image file(s) not found: {', '.join(missing)}.")
    return Prompt(id=record["id"], kind=kind, text=record["text"], images=resolved)
