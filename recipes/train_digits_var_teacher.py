"""Train the embedded default VAR teacher: a small multi-scale VQVAE and class-conditional VAR on digits.

Data: scikit-learn's bundled digits (1,797 images, 10 classes), upscaled to 32×32 RGB
(:func:`distilled_decoding.digits.load_digits_images`), with light random affine augmentation — the data and
augmentation of ``recipes/train_digits_teacher.py`` (the LlamaGen default). Models use the official classes at small
sizes:

* tokenizer: :class:`~distilled_decoding.MultiScaleVQVAE` with ch 32, ch_mult (1, 1, 2) (downsampling 4: a 32×32
  image is an 8×8 latent), patch nums (1, 2, 4, 8) → 85 tokens per image, codebook 256 × 8 (raw, not normalised,
  as VAR), 4 partially shared Phi convs. Trained with L1 + MSE reconstruction and the official VQ loss; the codebook
  starts from encoder latents and dead codes are restarted from the current residuals during the first half;
* teacher: :class:`~distilled_decoding.VAR` (depth 4, width 128, 4 heads, l2-normalised attention, 10 classes + the
  null class for CFG) trained with teacher forcing on ``--copies`` augmented encodings per image.

Writes ``<out>`` with ``VAR.save_pretrained`` (config.json + safetensors: the VAR with its VAE inside, about 7.9 MB)
and ``<out>/training.json``. Deterministic for a given seed, thread count and machine::

    python recipes/train_digits_var_teacher.py --out checkpoints/digits_var
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from distilled_decoding import VAR, MultiScaleVQVAE
from distilled_decoding.digits import NUM_CLASSES, augmented, cosine_lr, load_digits_images, to_model_range

PATCH_NUMS = (1, 2, 4, 8)
VAE_CONFIG = dict(
    vocab_size=256,
    z_channels=8,
    ch=32,
    ch_mult=(1, 1, 2),
    num_res_blocks=1,
    using_sa=False,
    using_mid_sa=False,
    share_quant_resi=4,
    v_patch_nums=PATCH_NUMS,
)
VAR_CONFIG = dict(
    num_classes=NUM_CLASSES,
    depth=4,
    embed_dim=128,
    num_heads=4,
    mlp_ratio=4.0,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.05,
    cond_drop_rate=0.1,
    attn_l2_norm=True,
    patch_nums=PATCH_NUMS,
    vocab_size=256,
    Cvae=8,
)


@torch.no_grad()
def residual_vectors(vae: MultiScaleVQVAE, x: torch.Tensor) -> torch.Tensor:
    """The vectors the quantiser matches at every scale (area-downsampled residuals, (M, Cvae)) for images x."""
    q = vae.quantize
    f = vae.quant_conv(vae.encoder(x))
    rest, out, last = f.clone(), [], len(q.v_patch_nums) - 1
    for si, pn in enumerate(q.v_patch_nums):
        z = F.interpolate(rest, size=(pn, pn), mode="area") if si != last else rest
        flat = rearrange(z, "b c h w -> (b h w) c")
        out.append(flat)
        emb = rearrange(q.embedding(q.nearest(flat)), "(b h w) c -> b c h w", b=x.shape[0], h=pn, w=pn)
        if si != last:
            emb = F.interpolate(emb, size=f.shape[-2:], mode="bicubic")
        rest.sub_(q.phi(si)(emb))
    return torch.cat(out)


@torch.no_grad()
def restart_dead_codes(vae: MultiScaleVQVAE, x: torch.Tensor, g: torch.Generator) -> int:
    """Codes no scale has used recently (usage EMA < 1% of the mean) restart at random current residual vectors."""
    hits = vae.quantize.ema_vocab_hit_SV.sum(0)
    dead = (hits < 0.01 * hits.mean()).nonzero().flatten()
    if len(dead):
        pool = residual_vectors(vae, x)
        pick = torch.randint(len(pool), (len(dead),), generator=g)
        vae.quantize.embedding.weight[dead] = pool[pick]
        vae.quantize.ema_vocab_hit_SV[:, dead] = hits.mean() / vae.quantize.ema_vocab_hit_SV.shape[0]
    return len(dead)


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> tuple[MultiScaleVQVAE, dict]:
    torch.manual_seed(seed)
    vae = MultiScaleVQVAE(**VAE_CONFIG, test_mode=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # codebook from encoder latents (all scales) of a first batch
        pool = residual_vectors(vae, augmented(images[torch.randint(len(images), (batch,), generator=g)], g))
        vae.quantize.embedding.weight.copy_(pool[torch.randint(len(pool), (vae.vocab_size,), generator=g)])
    opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.5, 0.9))
    vae.train()
    log: dict = {}
    restarted = 0
    bar = tqdm(range(steps), desc="multi-scale vqvae", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50)
        x = augmented(images[torch.randint(len(images), (batch,), generator=g)], g)
        rec, losses = vae(x)
        rec_l = (rec - x).abs().mean() + (rec - x).square().mean()
        loss = rec_l + losses["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 49 and step < steps // 2:
            restarted += restart_dead_codes(vae, x, g)
        log = {"recon": float(rec_l.detach()), "vq": float(losses["vq_loss"].detach())}
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    log["restarted_codes"] = restarted
    trained = MultiScaleVQVAE(**VAE_CONFIG, test_mode=True)  # the saved config says test_mode (frozen, eval)
    trained.load_state_dict(vae.state_dict())
    return trained.eval(), log


@torch.no_grad()
def encode_dataset(vae: MultiScaleVQVAE, images: torch.Tensor, labels: torch.Tensor, copies: int, seed: int):
    """``copies`` augmented encodings of every image (the first copy un-augmented)."""
    g = torch.Generator().manual_seed(seed)
    toks, labs = [], []
    for c in tqdm(range(copies), desc="tokenising", unit="pass", dynamic_ncols=True):
        for s in range(0, len(images), 256):
            chunk = images[s : s + 256]
            x = to_model_range(chunk) if c == 0 else augmented(chunk, g)
            toks.append(vae.encode(x))
            labs.append(labels[s : s + 256])
    return torch.cat(toks), torch.cat(labs)


def train_var(vae: MultiScaleVQVAE, tokens: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, lr: float,
              seed: int) -> tuple[VAR, dict]:  # fmt: skip
    torch.manual_seed(seed)
    var = VAR(**VAR_CONFIG)
    var.attach_vae(vae)
    inputs = vae.tokens_to_var_input(tokens)  # (M, 84, Cvae) teacher-forcing inputs, computed once
    params = [p for n, p in var.named_parameters() if not n.startswith("vae.")]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    var.train()
    vae.eval()
    log: dict = {}
    bar = tqdm(range(steps), desc="var teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        idx = torch.randint(len(tokens), (batch,), generator=g)
        logits = var.logits_from_inputs(inputs[idx], labels[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        log = {"ce": float(loss.detach())}
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    return var.eval(), log


@torch.no_grad()
def teacher_quality(var: VAR, n: int, cfg_scale: float, top_k: int, seed: int) -> dict:
    """Class accuracy and FID / IS / precision / recall (offline digits features) of n teacher samples."""
    from distilled_decoding.digits import to_uint8
    from distilled_decoding.metrics import class_accuracy, compute_metrics
    from distilled_decoding.sampling import sample_tokens

    labels = torch.arange(n) % NUM_CLASSES
    g = torch.Generator().manual_seed(seed)
    imgs = []
    for s in range(0, n, 250):
        tok = sample_tokens(var, labels[s : s + 250], generator=g, cfg_scale=cfg_scale, top_k=top_k)
        imgs.append(to_uint8(var.decode_tokens(tok)))
    imgs = torch.cat(imgs)
    reference, _ = load_digits_images(32, "all")
    m = compute_metrics(imgs, reference)
    return {"cfg_scale": cfg_scale, "top_k": top_k, "num_images": n, "class_acc": class_accuracy(imgs, labels),
            **{k: m[k] for k in ("fid", "is", "precision", "recall")}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/digits_var")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--var-steps", type=int, default=1600)
    p.add_argument("--var-batch", type=int, default=64)
    p.add_argument("--copies", type=int, default=8, help="augmented encodings per image for the VAR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the checkpoint was made with 1)")
    p.add_argument("--eval-images", type=int, default=1000, help="teacher samples for the quality report (0: none)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    images, labels = load_digits_images(32, "all")
    t0 = time.perf_counter()
    vae, vae_log = train_vae(images, args.vae_steps, args.vae_batch, 2e-3, args.seed)
    t_vae = time.perf_counter() - t0
    tokens, tok_labels = encode_dataset(vae, images, labels, args.copies, args.seed + 1)
    used = [int(torch.unique(s).numel()) for s in vae.split_scales(tokens[:, :, None])]
    var, var_log = train_var(vae, tokens, tok_labels, args.var_steps, args.var_batch, 1e-3, args.seed + 2)
    t_all = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    var.save_pretrained(out)
    with torch.no_grad():
        rec = vae.decode_tokens(tokens[: len(images)])
        rec_err = float((rec - to_model_range(images)).abs().mean())
    summary = {
        "data": "sklearn digits, 1797 images, 32x32 RGB (bicubic), random affine augmentation",
        "vae": {"config": VAE_CONFIG, "steps": args.vae_steps, "batch": args.vae_batch, "final": vae_log,
                "codes_used_per_scale": used, "recon_l1_unaugmented": round(rec_err, 5), "seconds": round(t_vae, 1)},
        "var": {"config": VAR_CONFIG, "steps": args.var_steps, "batch": args.var_batch, "final": var_log,
                "sequences": len(tokens), "seconds": round(t_all - t_vae, 1)},
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }  # fmt: skip
    if args.eval_images:
        t1 = time.perf_counter()
        summary["quality"] = [
            teacher_quality(var, args.eval_images, c, k, args.seed + 3) for c, k in ((0.0, 0), (1.0, 0), (2.0, 0))
        ]
        summary["quality_seconds"] = round(time.perf_counter() - t1, 1)
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
