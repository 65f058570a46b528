"""Build Distilled Decoding trajectories (noise → tokens through a frozen teacher of any registered family).

One process or many: ``accelerate launch recipes/build_trajectories.py --out runs/traj ...`` splits the shards
across processes (on a CPU-only machine: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``).
A killed run restarts where it stopped. Defaults: the family's embedded digits teacher in ``checkpoints/``.

    python recipes/build_trajectories.py --out runs/digits/trajectories --num-samples 20000
    accelerate launch recipes/build_trajectories.py --model c2i_B_256.pt --preset GPT-B --tokenizer vq_ds16_c2i.pt \\
        --out /data/dd/llamagen-b --num-samples 1200000 --batch-size 256 --cfg-scale 2.0 --top-k 8000
    python recipes/build_trajectories.py --kind var --out runs/digits_var/trajectories --cfg-scale 1.0
    python recipes/build_trajectories.py --model checkpoints/digits_t2i/gpt --tokenizer checkpoints/digits_llamagen/vq \
        --text-encoder checkpoints/digits_t2i/text_encoder --prompts checkpoints/digits_t2i/prompts_train.csv \
        --out runs/digits_t2i/trajectories                    # a text-to-image teacher: prompts + its T5 encoder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distilled_decoding import build_trajectories
from distilled_decoding.configs import ConfigError, command_line_errors
from distilled_decoding.prompts import load_prompts
from distilled_decoding.recipe import TeacherConfig, repo_path
from distilled_decoding.sampling import validate_sampling_args
from distilled_decoding.teachers import families


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
    p.add_argument("--kind", default="llamagen", choices=sorted(families()), help="the teacher family")
    p.add_argument("--model", default=None, help="official file or save_pretrained folder (default: embedded)")
    p.add_argument("--tokenizer", default=None, help="official tokenizer file or folder (default: embedded)")
    p.add_argument("--preset", default=None, help="GPT-B, GPT-L, ... / VAR depth (inferred when omitted)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per image (default: from the file name)")
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
    p.add_argument("--no-store-noise", action="store_true", help="regenerate noise from (seed, i) when read")
    p.add_argument("--text-encoder", default=None, help="T5 folder or Hub id (text-to-image teachers)")
    p.add_argument("--prompts", default=None, help="prompt file: .txt (one a line), .csv / .tsv, .json")
    p.add_argument("--prompt-column", default=None, help="CSV/TSV column of the prompts")
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
    tc = TeacherConfig(kind=args.kind, model=args.model, tokenizer=args.tokenizer, preset=args.preset,
                       block_size=args.block_size, dtype=args.dtype, text_encoder=args.text_encoder)  # fmt: skip
    teacher, tokenizer = tc.load()
    prompts = None if args.prompts is None else load_prompts(repo_path(args.prompts), args.prompt_column)
    return build_trajectories(
        teacher,
        args.out,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        cfg_interval=args.cfg_interval,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        codebook=tokenizer.codebook,
        shard_size=args.shard_size,
        store_noise=not args.no_store_noise,
        prompts=prompts,
        text_encoder=tc.load_text_encoder(teacher),
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
