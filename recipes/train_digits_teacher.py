"""Train the embedded default teacher: a small LlamaGen VQ tokenizer and class-conditional GPT on digits.

Data: scikit-learn's bundled digits (1,797 images, 10 classes), upscaled to 32×32 RGB
(:func:`distilled_decoding.digits.load_digits_images`), with light random affine augmentation.
Models use the same classes as the official ones, at small sizes:

* tokenizer: :class:`~distilled_decoding.VQTokenizer` with ch 32, ch_mult (1, 2, 2) → 8×8 = 64 tokens per image,
  codebook 256 × 8, l2-normalised like VQ-16;
* teacher: :class:`~distilled_decoding.LlamaGen` (c2i, block_size 64, vocab 256, 10 classes + the null class
  for CFG).

Writes ``<out>/vq`` and ``<out>/gpt`` (``save_pretrained``: config.json + safetensors) and ``<out>/training.json``.
Deterministic for a given seed, machine and thread count. On a 2-core CPU about an hour (tokenizer 33 min,
GPT 31 min); ``--device cuda`` takes minutes. A finished tokenizer stage is reused when the run is restarted::

    python recipes/train_digits_teacher.py --out checkpoints/digits_llamagen [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distilled_decoding import LlamaGen, VQTokenizer
from distilled_decoding.digits import NUM_CLASSES, augmented, cosine_lr, load_digits_images, to_model_range

VQ_CONFIG = dict(
    codebook_size=256,
    codebook_embed_dim=8,
    codebook_l2_norm=True,
    codebook_show_usage=True,
    ch=32,
    encoder_ch_mult=(1, 2, 2),
    decoder_ch_mult=(1, 2, 2),
    z_channels=64,
    num_res_blocks=1,
)
GPT_CONFIG = dict(
    dim=192,
    n_layer=4,
    n_head=6,
    multiple_of=64,
    vocab_size=256,
    num_classes=NUM_CLASSES,
    block_size=64,
    class_dropout_prob=0.1,
    token_dropout_p=0.1,
    resid_dropout_p=0.1,
    ffn_dropout_p=0.1,
)


def train_vq(
    images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, device: torch.device
) -> tuple[VQTokenizer, dict]:
    torch.manual_seed(seed)
    vq = VQTokenizer(**VQ_CONFIG).to(device)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(seed)
    vq.train()
    log: dict = {}
    bar = tqdm(range(steps), desc="vq tokenizer", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        idx = torch.randint(len(images), (batch,), generator=g)
        x = augmented(images[idx], g).to(device)  # data and augmentation stay on the CPU generator
        recon, losses = vq(x)
        rec = (recon - x).abs().mean() + (recon - x).square().mean()
        loss = rec + losses["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log = {"recon": float(rec.detach()), "vq": float(losses["total"].detach()),
               "usage": float(losses.get("codebook_usage", 0.0))}  # fmt: skip
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    return vq.eval().cpu(), log


@torch.no_grad()
def encode_dataset(vq: VQTokenizer, images: torch.Tensor, labels: torch.Tensor, copies: int, seed: int):
    """``copies`` augmented encodings of every image (the first copy un-augmented)."""
    g = torch.Generator().manual_seed(seed)
    toks, labs = [], []
    for c in tqdm(range(copies), desc="tokenising", unit="pass", dynamic_ncols=True):
        for s in range(0, len(images), 256):
            chunk = images[s : s + 256]
            x = to_model_range(chunk) if c == 0 else augmented(chunk, g)
            toks.append(vq.encode(x.to(vq.device)).cpu())
            labs.append(labels[s : s + 256])
    return torch.cat(toks), torch.cat(labs)


def train_gpt(tokens: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
              device: torch.device):  # fmt: skip
    torch.manual_seed(seed)
    gpt = LlamaGen(**GPT_CONFIG).to(device)
    decay = [p for n, p in gpt.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in gpt.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    gpt.train()
    log: dict = {}
    bar = tqdm(range(steps), desc="gpt teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=200)
        idx = torch.randint(len(tokens), (batch,), generator=g)
        x, y = tokens[idx].to(device), labels[idx].to(device)
        logits = gpt(x, y)
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        log = {"ce": float(loss.detach())}
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    return gpt.eval().cpu(), log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/digits_llamagen")
    p.add_argument("--vq-steps", type=int, default=1500)
    p.add_argument("--gpt-steps", type=int, default=1500)
    p.add_argument("--copies", type=int, default=16, help="augmented encodings per image for the GPT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="cpu", help="cpu (about 90 min on 2 cores) or cuda (about 2 min)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = torch.device(args.device)
    images, labels = load_digits_images(32, "all")
    t0 = time.perf_counter()
    if (out / "vq" / "config.json").is_file():  # a finished first stage is reused (the recipe is deterministic)
        vq = VQTokenizer.from_pretrained(out / "vq").eval()
        vq_log = json.loads((out / "vq_stage.json").read_text())
        print(f"reusing the tokenizer in {out / 'vq'}")
    else:
        vq, vq_log = train_vq(images, args.vq_steps, 64, 2e-3, args.seed, device)
        vq.save_pretrained(out / "vq")
        (out / "vq_stage.json").write_text(json.dumps(vq_log))
    t_vq = time.perf_counter() - t0
    tokens, tok_labels = encode_dataset(vq.to(device), images, labels, args.copies, args.seed + 1)
    vq.cpu()
    used = int(torch.unique(tokens).numel())
    gpt, gpt_log = train_gpt(tokens, tok_labels, args.gpt_steps, 128, 1e-3, args.seed + 2, device)
    t_all = time.perf_counter() - t0
    gpt.save_pretrained(out / "gpt")
    (out / "vq_stage.json").unlink(missing_ok=True)
    with torch.no_grad():
        rec = vq.decode_tokens(tokens[: len(images)], grid=(8, 8))
        rec_err = float((rec.clamp(-1, 1) - to_model_range(images)).abs().mean())
    summary = {
        "data": "sklearn digits, 1797 images, 32x32 RGB (bicubic), random affine augmentation",
        "vq": {"config": VQ_CONFIG, "steps": args.vq_steps, "final": vq_log, "codes_used": used,
               "recon_l1_unaugmented": round(rec_err, 5), "seconds": round(t_vq, 1)},
        "gpt": {"config": GPT_CONFIG, "steps": args.gpt_steps, "final": gpt_log, "sequences": len(tokens),
                "seconds": round(t_all - t_vq, 1)},
        "seed": args.seed,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
