"""Distil a VAR teacher into a one/two-step generator, end to end.

With no arguments it distils the embedded default VAR (``checkpoints/digits_var``: scales 1, 2, 4, 8 → 85 tokens,
its multi-scale VQVAE inside) on CPU: builds the trajectories if the folder has none, trains the
:class:`~distilled_decoding.students.var.DDVARStudent`, saves the pipeline, evaluates it against the teacher and
writes a sample grid. Works with ``python`` and with ``accelerate launch``::

    accelerate launch recipes/distill_var.py
    accelerate launch recipes/distill_var.py --config recipes/configs/var_d16.yaml \\
        teacher.model=/ckpt/var_d16.pth teacher.tokenizer=/ckpt/vae_ch160v4096z32.pth
    python recipes/distill_var.py distill.max_steps=200 output_dir=runs/quick
    accelerate launch recipes/distill_var.py --config recipes/configs/digits_var_dd2.yaml   # Distilled Decoding 2
    accelerate launch recipes/distill_var.py --config recipes/configs/var_d16_dd2.yaml      # DD2's VAR-d16 settings

Timesteps and ``split`` count *scales* for VAR (the released d16 student: ``distill.timesteps=[0,5]``,
``distill.split=5``; d20/d24: 4); ``evaluate.refine=[T, t2]`` is in scales too. The embedded default
(``recipes/configs/digits_var.yaml``) trains at timesteps (0, 2) with loss ``ce`` (every scale from the logits head).
With ``distill.method: dd2`` (the ``*_dd2.yaml`` configs) the job trains a one-step DD2 generator instead
(:mod:`distilled_decoding.methods`; GTS initialisation, then conditional score distillation; the refined rows of its
table count scales too). Note that the teacher's ``trajectories.cfg_scale`` is VAR's official ``cfg`` (a linear ramp
over the scales, see :mod:`distilled_decoding.teachers.var`), not LlamaGen's constant scale.

Overrides are ``section.field=value`` (sections: teacher, trajectories, distill, evaluate; top level:
output_dir, stages). A killed run started again with the same settings resumes every stage.
"""

from __future__ import annotations

import argparse

from distilled_decoding.configs import command_line_errors
from distilled_decoding.recipe import ROOT, load_recipe_config, run

#: The embedded default: the digits VAR, settings that finish in about a quarter of an hour on a 2-core CPU.
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "digits_var.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with sections teacher/trajectories/distill/evaluate")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    with command_line_errors(p.prog):  # a bad config: one line on stderr, exit code 2
        return run(load_recipe_config(args.config or DEFAULT_CONFIG, args.overrides))


if __name__ == "__main__":
    main()
