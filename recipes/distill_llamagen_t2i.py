"""Distil a LlamaGen text-to-image teacher into a one/two-step text-conditioned generator, end to end.

With no arguments it distils the embedded T2I default (``recipes/configs/digits_t2i.yaml``: the digits T2I teacher
and its tiny T5 encoder shipped in ``checkpoints/digits_t2i``) on CPU: builds the trajectories from the training
captions (each distinct caption encoded once), trains the student, saves the pipeline with its text encoder,
evaluates it against the teacher on held-out captions (FID, prompt adherence under the digits classifier, speed at
batch 1 and at the evaluation batch) and writes a sample grid labelled with the prompts::

    accelerate launch recipes/distill_llamagen_t2i.py
    accelerate launch recipes/distill_llamagen_t2i.py --config recipes/configs/llamagen_xl_t2i.yaml \\
        trajectories.prompts=/data/laion_coco_captions.txt
    python recipes/distill_llamagen_t2i.py distill.max_steps=200 output_dir=runs/quick

Overrides are ``section.field=value`` as for ``recipes/distill_llamagen.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distilled_decoding.recipe import load_recipe_config, run

DEFAULT_T2I_CONFIG = Path(__file__).resolve().parent / "configs" / "digits_t2i.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_T2I_CONFIG), help="YAML file (default: the embedded T2I job)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    return run(load_recipe_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
