"""Regenerate the images of quantkit's default verify suite (quantkit/verify/suite/*.png).

Drawn with PIL, so they are small (a few KB), license-free and reproducible (byte for byte with the same Pillow). Stills are 640x480,
large enough that MiniCPM-V slices them (1 overview + 2 slices); video frames are 320x240, unsliced, as the
model treats frames. Run: python scripts/make_verify_suite.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SUITE = Path(__file__).resolve().parents[1] / "quantkit" / "verify" / "suite"


def shapes() -> Image.Image:
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 140, 260, 340), fill=(220, 40, 40))
    draw.rectangle((330, 120, 560, 350), fill=(40, 90, 220))
    draw.polygon([(320, 460), (420, 370), (520, 460)], fill=(40, 170, 60))
    return image


def sign() -> Image.Image:
    image = Image.new("RGB", (640, 480), (250, 235, 120))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=72)
    draw.rectangle((20, 20, 620, 460), outline="black", width=8)
    draw.text((320, 180), "STOP", fill="black", font=font, anchor="mm")
    draw.text((320, 300), "42 km", fill=(160, 20, 20), font=font, anchor="mm")
    return image


def gradient() -> Image.Image:
    image = Image.new("RGB", (640, 480))
    image.putdata([(x * 255 // 639, 80, 255 - y * 255 // 479) for y in range(480) for x in range(640)])
    return image


def frame(index: int, count: int) -> Image.Image:
    """A ball rolling left to right over a floor line."""
    image = Image.new("RGB", (320, 240), (200, 225, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 190, 320, 240), fill=(120, 90, 60))
    x = 30 + index * (260 // (count - 1))
    draw.ellipse((x - 22, 146, x + 22, 190), fill=(250, 130, 0))
    return image


def main() -> None:
    SUITE.mkdir(parents=True, exist_ok=True)
    stills = {"shapes.png": shapes(), "sign.png": sign(), "gradient.png": gradient()}
    frames = {f"frame{i}.png": frame(i, 4) for i in range(4)}
    for name, image in {**stills, **frames}.items():
        image.save(SUITE / name, optimize=True)
        print(name, (SUITE / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
