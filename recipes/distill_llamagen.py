"""Distil a LlamaGen teacher into a one/two-step generator, end to end.

With no arguments it distils the embedded default (a small digits teacher shipped in ``checkpoints/``) on
CPU: builds the trajectories if the folder has none, trains the student, saves the pipeline, evaluates it
against the teacher and writes a sample grid. Works with ``python`` and with ``accelerate launch``::

    accelerate launch recipes/distill_llamagen.py
    accelerate launch recipes/distill_llamagen.py --config recipes/configs/llamagen_b.yaml \\
        teacher.model=/ckpt/c2i_B_256.pt teacher.tokenizer=/ckpt/vq_ds16_c2i.pt
    python recipes/distill_llamagen.py distill.max_steps=200 output_dir=runs/quick

Overrides are ``section.field=value`` (sections: teacher, trajectories, distill, evaluate; top level:
output_dir, stages). A killed run started again with the same settings resumes every stage.
"""

from __future__ import annotations

import argparse

from distilled_decoding.configs import command_line_errors
from distilled_decoding.recipe import load_recipe_config, run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with sections teacher/trajectories/distill/evaluate")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    with command_line_errors(p.prog):  # a bad config: one line on stderr, exit code 2
        return run(load_recipe_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
