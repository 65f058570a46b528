"""Train the digits classifier behind the ``"digits-cnn"`` metrics (FID / IS / precision-recall, accuracy).

    python recipes/train_digits_classifier.py --out checkpoints/digits_classifier

Trains :class:`distilled_decoding.metrics.DigitsClassifier` on the train split of
:func:`distilled_decoding.digits.load_digits_images` (32×32 RGB), reports accuracy on the val split, and saves
``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``) and ``training_info.json``.

Augmentation, so that the classifier stays usable on generated images: a random rotation (±12°), zoom
(0.85–1.15) and shift (±10 % of the side) per image, plus, each with probability 0.3, a Gaussian blur
(σ 0.4–1.2 px), additive Gaussian noise (σ ≤ 0.08 in [0, 1] units), per-channel gain/offset jitter (tolerates
slightly coloured outputs) and contrast changes. Deterministic for a given ``--seed`` and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distilled_decoding.digits import load_digits_images, random_affine
from distilled_decoding.metrics import DigitsClassifier


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` ``(B, C, H, W)`` with its own σ ``(B,)`` (5×5 separable kernel)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (B, 5)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kc = k.repeat_interleave(c, dim=0)  # (B*C, 5)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kc[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kc[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` → augmented float ``(B, 3, H, W)`` in [0, 1]."""
    x = random_affine(images, generator=g, max_rotation=12.0, max_translation=0.1, scale_range=(0.85, 1.15))
    x = x.float() / 255.0
    b = x.shape[0]

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=g) < p).float()[:, None, None, None]

    blurred = _gaussian_blur(x, 0.4 + 0.8 * torch.rand(b, generator=g))
    x = torch.lerp(x, blurred, coin(0.3))
    contrast = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=g)
    x = torch.lerp(x, (x - 0.5) * contrast + 0.5, coin(0.3))
    gain = 1 + 0.1 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    offset = 0.05 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    x = torch.lerp(x, x * gain + offset, coin(0.3))
    noise = torch.randn(x.shape, generator=g) * 0.08 * torch.rand(b, 1, 1, 1, generator=g)
    x = x + noise * coin(0.3)
    return x.clamp(0, 1)


@torch.no_grad()
def evaluate(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.predict(images) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("checkpoints/digits_classifier"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny late-training values are otherwise very slow on CPU
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_images(32, "train")
    x_val, y_val = load_digits_images(32, "val")

    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train {len(x_train)} / val {len(x_val)} images, {n_params} parameters, {total} steps")

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            acc = evaluate(model, x_val, y_val)
            print(
                f"epoch {epoch + 1:3d}  loss {loss_sum / len(x_train):.4f}  val acc {acc:.4f}  "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )

    model.eval()
    info = {
        "val_accuracy": evaluate(model, x_val, y_val),
        "train_accuracy": evaluate(model, x_train, y_train),
        "num_train": len(x_train),
        "num_val": len(x_val),
        "num_parameters": n_params,
        "train_seconds": round(time.time() - t0, 1),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
