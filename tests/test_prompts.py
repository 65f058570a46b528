"""Prompt sources: text files, CSV/TSV columns (PartiPrompts, LlamaGen's COCO captions), COCO JSON, lists; errors."""

from __future__ import annotations

import json

import pytest
import torch

from distilled_decoding.prompts import load_prompt_labels, load_prompts


def test_text_file_one_prompt_a_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red bus\n\n  a handwritten seven  \nthe number 7, thick\n")
    assert load_prompts(f) == ["a red bus", "a handwritten seven", "the number 7, thick"]


def test_csv_and_tsv_columns(tmp_path):
    f = tmp_path / "captions.csv"
    f.write_text('id,caption,digit\n1,"a seven, slanted",7\n2,a zero,0\n')
    assert load_prompts(f) == ["a seven, slanted", "a zero"]  # the "caption" column by default, quoting kept
    assert load_prompts(f, "ID") == ["1", "2"] and load_prompts(f, 2) == ["7", "0"]
    assert torch.equal(load_prompt_labels(f, "digit"), torch.tensor([7, 0]))
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tx, y\na red bus\tVehicles\tBasic\t\n")
    assert load_prompts(parti) == ["bond", "a red bus"]
    coco = tmp_path / "coco_captions.csv"  # LlamaGen's file: one tab-separated column despite the name
    coco.write_text("Prompt\nA man, riding a bike.\nTwo cats\n")
    assert load_prompts(coco, delimiter="\t") == ["A man, riding a bike.", "Two cats"]
    with pytest.raises(ValueError, match=r"line 2 has 2 cells but the header \['Prompt'\] has 1; is the delimiter"):
        load_prompts(coco)  # a comma delimiter would cut the caption at its comma


def test_coco_json_and_lists(tmp_path):
    f = tmp_path / "captions_val2014.json"
    f.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "A bus. "}, {"caption": "Two dogs"}]}))
    assert load_prompts(f) == ["A bus.", "Two dogs"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(tmp_path / "l.json") == ["x", "y"]
    assert load_prompts(["a", "b"]) == ["a", "b"]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="prompts: expected at least one prompt, got an empty list"):
        load_prompts([])
    with pytest.raises(ValueError, match=r"prompts\[1\]: an empty prompt"):
        load_prompts(["a", "  "])
    with pytest.raises(ValueError, match=r"prompts: .*missing\.txt does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    f = tmp_path / "c.csv"
    f.write_text("id,caption\n1,a\n2,\n")
    with pytest.raises(ValueError, match=r"c\.csv line 3: empty prompt"):
        load_prompts(f)
    with pytest.raises(ValueError, match=r"prompt_column='text': not a column of .*columns: \['id', 'caption'\]"):
        load_prompts(f, "text")
    (tmp_path / "two.csv").write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match="none is named one of"):
        load_prompts(tmp_path / "two.csv")
    labelled = tmp_path / "l.csv"
    labelled.write_text("caption,digit\na seven,7\n")
    with pytest.raises(ValueError, match="label_column='caption': .* non-integer label"):
        load_prompt_labels(labelled, "caption")
    with pytest.raises(ValueError, match="prompt_column='x': only for a CSV/TSV file"):
        load_prompts(["a"], "x")
