"""Distil a PAR teacher (region-parallel LlamaGen, k tokens a decoding step) into a one/two-step generator.

With no arguments it distils the embedded PAR-4× digits teacher (``checkpoints/digits_par``, converted from the
digits LlamaGen by ``recipes/train_par_teacher.py``: 8×8 tokens in 4 anchors + 15 groups = 19 steps) on CPU:
trajectories through PAR (sequence order, flow map), the :class:`~distilled_decoding.students.par.DDPARStudent`
(attention by PAR's decode groups, RoPE of each position's raster cell), the pipeline, and the table of the PAR
teacher vs DD 1-step / 2-step / refined, with the raster LlamaGen teacher as an extra row. Works with ``python`` and
``accelerate launch``::

    accelerate launch recipes/distill_par.py
    accelerate launch recipes/distill_par.py --config recipes/configs/par_xxl_4x.yaml \\
        teacher.model=/ckpt/PAR-XXL-4x.pt teacher.tokenizer=/ckpt/vq_ds16_c2i.pt
    python recipes/distill_par.py distill.max_steps=200 output_dir=runs/quick

Timesteps, ``split`` and ``evaluate.refine`` count PAR decoding steps (k anchors, then k tokens a step). Overrides
are ``section.field=value`` (sections: teacher, trajectories, distill, evaluate; top level: output_dir, stages). A
killed run started again with the same settings resumes every stage. Equivalent:
``distilled-decoding distill --config recipes/configs/digits_par.yaml``.
"""

from __future__ import annotations

import argparse

from distilled_decoding.recipe import ROOT, load_recipe_config, run

#: The embedded default: the converted digits PAR-4x, the LlamaGen digits job's settings.
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "digits_par.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with sections teacher/trajectories/distill/evaluate")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    return run(load_recipe_config(args.config or DEFAULT_CONFIG, args.overrides))


if __name__ == "__main__":
    main()
