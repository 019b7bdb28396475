"""Render the demo's calibration set: synthetic document-like images with lines of text.

The demo model (PP-OCRv4 text detection) finds text regions, so it is calibrated on what it will see: pages
of printed text in several sizes, colours and backgrounds. Deterministic: the same seed writes the same files.

    python calib_data/render_text.py calib_data/text --count 48 --size 320
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

WORDS = ("quantization scale zero point weight activation layer channel tensor model accuracy calibration "
         "invoice total amount date street number receipt order price quantity customer account balance "
         "page chapter section figure table report summary network image text detection onnx runtime").split()


def render(path: Path, rng: random.Random, size: int) -> None:
    from PIL import Image, ImageDraw, ImageFont

    bg = tuple(rng.randint(170, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):  # faint boxes and rules, as on forms
        x0, y0 = rng.randrange(size), rng.randrange(size)
        draw.rectangle([x0, y0, x0 + rng.randint(20, 160), y0 + rng.randint(10, 80)],
                       outline=tuple(rng.randint(120, 220) for _ in range(3)))
    y = rng.randint(4, 24)
    while y < size - 16:
        font_px = rng.choice((12, 14, 16, 20, 24, 32))
        font = ImageFont.load_default(size=font_px)
        line = " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(1, 99999))
                        for _ in range(rng.randint(1, 6)))
        ink = tuple(rng.randint(0, 90) for _ in range(3))
        draw.text((rng.randint(4, size // 3), y), line, fill=ink, font=font)
        y += int(font_px * rng.uniform(1.3, 2.4))
    im.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for k in range(args.count):
        render(args.out / f"text_{k:03d}.png", rng, args.size)
    print(f"rendered {args.count} images into {args.out}")


if __name__ == "__main__":
    main()
