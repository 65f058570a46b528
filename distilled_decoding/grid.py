"""Sample grids with text labels (prompts above the columns, sampler names beside the rows), drawn with Pillow."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["labelled_grid"]


def labelled_grid(
    images: dict[str, Tensor],
    rows: list[str],
    columns: list[int],
    column_labels: list[str],
    path: str | Path,
    *,
    cell: int = 96,
    pad: int = 4,
    label_width: int = 150,
) -> Path:
    """PNG grid: row r shows ``images[rows[r]][columns]`` (uint8 (B, 3, H, W)), each image scaled to ``cell`` pixels
    (nearest neighbour); ``column_labels`` (wrapped) above the columns, the row names on the left. Returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    if len(column_labels) != len(columns):
        raise ValueError(f"column_labels: expected {len(columns)} labels (one per column), got {len(column_labels)}")
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    wrapped = [textwrap.fill(label, chars) for label in column_labels]
    line_h = 12
    head = pad + line_h * max(1 + w.count("\n") for w in wrapped) + pad
    width = label_width + len(columns) * (cell + pad) + pad
    height = head + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(wrapped):
        draw.multiline_text((label_width + j * (cell + pad), pad), text, fill="black", font=font, spacing=2)
    for r, name in enumerate(rows):
        y = head + r * (cell + pad)
        draw.multiline_text((pad, y + cell // 2 - 6), textwrap.fill(name, label_width // 6), fill="black", font=font)
        batch = images[name][torch.as_tensor(columns)]
        for j, img in enumerate(batch):
            tile = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + j * (cell + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
