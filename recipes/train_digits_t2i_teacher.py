"""Train the embedded text-to-image default: a small LlamaGen T2I teacher and its tiny T5 text encoder, on captions of
the digits.

Data: scikit-learn's bundled digits (1,797 images) tokenised by the digits VQ tokenizer (reused from
``checkpoints/digits_llamagen/vq``; 16 augmented encodings per image, as the class-conditional recipe), each paired
at every step with a random caption of its digit from :data:`distilled_decoding.digits_text.TRAIN_TEMPLATES`
("a handwritten seven", "the number 7 in thick strokes", ...). The held-out templates
(:data:`~distilled_decoding.digits_text.EVAL_TEMPLATES`) are only used to measure prompt accuracy at the end.

Models (the official classes, small):

* text encoder: ``ByT5Tokenizer()`` + a tiny ``T5EncoderModel`` (d_model 64, 2 layers; no download), trained jointly
  with the GPT and then frozen — read through :class:`~distilled_decoding.text.T5TextEncoder` like FLAN-T5-XL, with
  ``max_length`` = 40 caption positions;
* teacher: :class:`~distilled_decoding.LlamaGen` ``model_type="t2i"`` (caption projection 64 → 192, 40 caption
  positions, left padding and caption masks as LlamaGen's T2I models, learned-null-caption dropout 0.1 for CFG),
  its transformer initialised from the class-conditional digits GPT (``checkpoints/digits_llamagen/gpt``: same
  size; the 2-D RoPE of the image positions does not depend on the number of condition positions).

Writes ``<out>/gpt`` (LlamaGen ``save_pretrained``), ``<out>/text_encoder`` (model + tokenizer, loadable with
``T5TextEncoder.from_pretrained``), ``<out>/prompts_train.csv`` / ``prompts_eval.csv`` (columns ``prompt,digit``) and
``<out>/training.json`` (settings, losses, time, the teacher's prompt accuracy under the digits classifier)::

    python recipes/train_digits_t2i_teacher.py --out checkpoints/digits_t2i [--device cuda]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from train_digits_teacher import GPT_CONFIG, encode_dataset

from distilled_decoding import LlamaGen, T5TextEncoder, TextCondition, VQTokenizer
from distilled_decoding.digits import cosine_lr, load_digits_images, to_uint8
from distilled_decoding.digits_text import DIGITS_CAPTION_TOKENS, TEXT_ENCODER_CONFIG, digit_prompts, tiny_text_encoder
from distilled_decoding.metrics import class_accuracy
from distilled_decoding.sampling import sample_tokens
from distilled_decoding.text import tokenize_prompts

ROOT = Path(__file__).resolve().parents[1]
T2I_CONFIG = {**GPT_CONFIG, "model_type": "t2i", "caption_dim": TEXT_ENCODER_CONFIG["d_model"],
              "cls_token_num": DIGITS_CAPTION_TOKENS}  # fmt: skip


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (records do not carry the machine's layout)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def t2i_from_c2i(c2i: LlamaGen) -> LlamaGen:
    """A T2I GPT whose transformer, token embeddings and head are the class-conditional GPT's."""
    gpt = LlamaGen(**T2I_CONFIG)
    sd = {k: v for k, v in c2i.state_dict().items() if not k.startswith("cls_embedding.")}
    missing, unexpected = gpt.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("cls_embedding.") for k in missing), (missing, unexpected)
    return gpt


def write_prompts(path: Path, prompts: list[str], digits: torch.Tensor) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "digit"])
        w.writerows([p, int(d)] for p, d in zip(prompts, digits))


def train(gpt, t5, ids, mask, prompt_digits, tokens, labels, steps, batch, lr, seed, device):
    """Joint training of the GPT and the T5 encoder: CE of the image tokens given a random caption of the digit."""
    torch.manual_seed(seed)
    gpt, t5 = gpt.to(device).train(), t5.to(device).train()
    decay = [p for p in gpt.parameters() if p.ndim >= 2]
    no_decay = [p for p in gpt.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0},
              {"params": list(t5.parameters()), "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    by_digit = [torch.nonzero(prompt_digits == d).flatten() for d in range(10)]
    g = torch.Generator().manual_seed(seed)
    log: dict = {}
    bar = tqdm(range(steps), desc="t2i teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        idx = torch.randint(len(tokens), (batch,), generator=g)
        x, y = tokens[idx].to(device), labels[idx]
        pick = torch.stack([by_digit[int(d)][torch.randint(len(by_digit[int(d)]), (1,), generator=g)][0] for d in y])
        m = mask[pick].to(device)
        hidden = t5(input_ids=ids[pick].to(device), attention_mask=m)["last_hidden_state"]
        logits = gpt(x, TextCondition.from_padded(hidden, m.bool()))
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*gpt.parameters(), *t5.parameters()], 1.0)
        opt.step()
        log = {"ce": float(loss.detach())}
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    return gpt.eval().cpu(), t5.eval().cpu(), log


@torch.no_grad()
def prompt_accuracy(gpt, encoder, vq, prompts, digits, n, cfg_scale, seed, batch=160) -> float:
    """Fraction of ``n`` teacher samples (prompt k = i mod P) the digits classifier reads as the prompt's digit."""
    order = torch.arange(n) % len(prompts)
    g = torch.Generator().manual_seed(seed)
    images = []
    for s in range(0, n, batch):
        cond = encoder.encode([prompts[int(k)] for k in order[s : s + batch]])
        tok = sample_tokens(gpt, cond, generator=g, cfg_scale=cfg_scale)
        images.append(to_uint8(vq.decode_tokens(tok, grid=gpt.token_grid)))
    return class_accuracy(torch.cat(images), digits[order])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/digits_t2i")
    p.add_argument("--init", default=str(ROOT / "checkpoints" / "digits_llamagen"),
                   help="folder with the digits VQ tokenizer (vq/) and the class-conditional GPT (gpt/)")  # fmt: skip
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--copies", type=int, default=16, help="augmented encodings per image")
    p.add_argument("--eval-samples", type=int, default=480, help="teacher samples for the prompt accuracy")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance of the accuracy measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, init, device = Path(args.out), Path(args.init), torch.device(args.device)
    t0 = time.perf_counter()
    vq = VQTokenizer.from_pretrained(init / "vq").eval()
    c2i = LlamaGen.from_pretrained(init / "gpt").eval()
    images, labels = load_digits_images(32, "all")
    tokens, tok_labels = encode_dataset(vq.to(device), images, labels, args.copies, args.seed + 1)
    vq.cpu()
    t5, byt5 = tiny_text_encoder(args.seed + 3)
    train_prompts, train_digits = digit_prompts("train")
    eval_prompts, eval_digits = digit_prompts("eval")
    ids, mask = tokenize_prompts(train_prompts, byt5, max_length=DIGITS_CAPTION_TOKENS)
    longest = max(int(m.sum()) for m in mask)
    t_data = time.perf_counter() - t0
    gpt, t5, log = train(t2i_from_c2i(c2i), t5, ids, mask, train_digits, tokens, tok_labels, args.steps, args.batch,
                         args.lr, args.seed + 2, device)  # fmt: skip
    t_train = time.perf_counter() - t0 - t_data
    encoder = T5TextEncoder(t5, byt5, max_length=DIGITS_CAPTION_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    gpt.save_pretrained(out / "gpt")
    encoder.save_pretrained(out / "text_encoder")
    write_prompts(out / "prompts_train.csv", train_prompts, train_digits)
    write_prompts(out / "prompts_eval.csv", eval_prompts, eval_digits)
    t1 = time.perf_counter()
    acc = {split: prompt_accuracy(gpt, encoder, vq, ps, ds, args.eval_samples, args.cfg_scale, args.seed + 4)
           for split, ps, ds in (("eval (held-out templates)", eval_prompts, eval_digits),
                                 ("train templates", train_prompts, train_digits))}  # fmt: skip
    summary = {
        "data": "sklearn digits, 1797 images, 32x32 RGB, tokenised by checkpoints/digits_llamagen/vq with random "
        f"affine augmentation ({args.copies} copies); captions: {len(train_prompts)} training prompts "
        f"({len(train_prompts) // 20} templates x word/numeral x 10 digits), {len(eval_prompts)} held-out prompts",
        "text_encoder": {"tokenizer": "ByT5Tokenizer()", "config": TEXT_ENCODER_CONFIG,
                         "max_length": DIGITS_CAPTION_TOKENS, "longest_training_caption": longest,
                         "parameters": sum(p.numel() for p in t5.parameters()), "trained": "jointly with the GPT"},
        "gpt": {"config": T2I_CONFIG, "init": "transformer, token embeddings and head of " + _shown(init / "gpt"),
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "final": log,
                "sequences": len(tokens), "seconds": round(t_train, 1)},
        "prompt_accuracy": {"cfg_scale": args.cfg_scale, "samples": args.eval_samples, "classifier":
                            "checkpoints/digits_classifier", **{k: round(v, 4) for k, v in acc.items()},
                            "seconds": round(time.perf_counter() - t1, 1)},
        "data_seconds": round(t_data, 1),
        "seed": args.seed,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
