"""The one-command benchmark suite runs end to end (CPU smoke test with the embedded defaults) and writes JSON."""

from __future__ import annotations

import json

import pytest

from distilled_decoding.cli import main


@pytest.mark.slow
def test_quick_suite_writes_every_section(tmp_path):
    out = tmp_path / "quick.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == "quick" and result["dtype"] == "float32"
    assert {"sampler", "trajectories", "pipeline_llamagen", "pipeline_var", "summary", "env"} <= set(result)
    row = result["pipeline_llamagen"]["results"]["batch_2"]
    assert row["teacher AR (multinomial)"]["speedup_vs_teacher"] == 1.0
    for name in ("teacher AR (flow map)", "DD 1-step", "DD 2-step", "DD 1-step floor (forward + decode)"):
        assert row[name]["images_per_s"] > 0 and row[name]["median_s"] > 0, name
    assert result["trajectories"]["results"]["batch_2"]["pairs_per_s"] > 0
    assert any(k.startswith("pipeline_var batch_2 DD 1-step") for k in result["summary"])
