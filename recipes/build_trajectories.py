"""Build Distilled Decoding trajectories (noise → tokens through a frozen LlamaGen teacher).

One process or many: ``accelerate launch recipes/build_trajectories.py --out runs/traj ...`` splits the shards
across processes (on a CPU-only machine: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``).
A killed run restarts where it stopped. Defaults: the embedded digits teacher in ``checkpoints/``.

    python recipes/build_trajectories.py --out runs/digits/trajectories --num-samples 20000
    accelerate launch recipes/build_trajectories.py --gpt c2i_B_256.pt --gpt-preset GPT-B --vq vq_ds16_c2i.pt \\
        --out /data/dd/llamagen-b --num-samples 1200000 --batch-size 256 --cfg-scale 2.0 --top-k 8000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distilled_decoding import build_trajectories
from distilled_decoding.configs import ConfigError, command_line_errors
from distilled_decoding.sampling import validate_sampling_args
from distilled_decoding.teachers import load_llamagen_teacher

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "checkpoints" / "digits_llamagen"


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", default=str(DEFAULT / "gpt"), help="official .pt/.safetensors or a save_pretrained folder")
    p.add_argument("--gpt-preset", default=None, help="GPT-B, GPT-L, ... (inferred from the file when omitted)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per image (default: from the file name)")
    p.add_argument("--vq", default=str(DEFAULT / "vq"), help="official vq_ds16_c2i.pt or a save_pretrained folder")
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=_at_least(1), default=20000)
    p.add_argument("--batch-size", type=_at_least(1), default=256)
    p.add_argument("--shard-size", type=_at_least(1), default=10000)
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="teacher weights dtype")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> Path:
    p = parser()
    args = p.parse_args(argv)
    with command_line_errors(p.prog):
        return _build(args)


def _build(args: argparse.Namespace) -> Path:
    try:
        validate_sampling_args(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p)  # fmt: skip
    except ValueError as e:
        name, rest = str(e).split("=", 1)
        raise ConfigError(f"--{name.replace('_', '-')}={rest}") from None
    gpt, vq = load_llamagen_teacher(args.gpt, args.vq, preset=args.gpt_preset, block_size=args.block_size)
    gpt = gpt.to(getattr(torch, args.dtype))
    return build_trajectories(
        gpt,
        args.out,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        cfg_interval=args.cfg_interval,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        codebook=vq.codebook,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
