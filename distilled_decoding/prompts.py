"""Prompt sources: where the prompts of text-to-image trajectories and evaluations come from.

:func:`load_prompts` reads

* a Python list of strings (used as given);
* a text file (``.txt`` or any other suffix): one prompt per line, surrounding whitespace stripped, blank lines
  skipped;
* a CSV / TSV file (``.csv``, ``.tsv``; a header row, the standard ``csv`` quoting; ``delimiter`` defaults to a
  tab for ``.tsv`` and a comma otherwise): one column, chosen by ``column`` (a name, case-insensitive, or a 0-based
  index); by default the column named ``prompt``, ``prompts``, ``caption``, ``captions`` or ``text``, or the only
  column. PartiPrompts (``PartiPrompts.tsv``, column ``Prompt``) reads as it is; LlamaGen's
  ``evaluations/t2i/coco_captions.csv`` is tab-separated despite its name (``delimiter="\t"``). A row with more
  cells than the header is an error (a wrong delimiter would otherwise cut captions at their commas);
* a JSON file: a list of strings, or COCO's caption annotations (``captions_val2014.json``: every
  ``annotations[*].caption``, in file order).

:func:`load_prompt_labels` reads a second column of the same file as integers (e.g. the digit a caption names, for
the prompt-adherence column of the evaluation). Empty prompts in a CSV/TSV/JSON source are errors naming the row.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["PromptSource", "load_prompts", "load_prompt_labels", "DEFAULT_COLUMNS"]

#: column names picked by default (case-insensitive), in this order
DEFAULT_COLUMNS = ("prompt", "prompts", "caption", "captions", "text")

PromptSource = str | os.PathLike | Sequence[str]


def _rows(path: Path, delimiter: str | None) -> tuple[list[str], list[list[str]]]:
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise ValueError(f"prompts: {path} is empty (expected a header row and one prompt per row)")
    return rows[0], rows[1:]


def _column_index(header: list[str], column: str | int | None, path: Path, name: str) -> int:
    lower = [h.strip().lower() for h in header]
    if column is None:
        found = [lower.index(c) for c in DEFAULT_COLUMNS if c in lower]
        if found:
            return found[0]
        if len(header) == 1:
            return 0
        raise ValueError(
            f"{name}: {path} has columns {header}; none is named one of {list(DEFAULT_COLUMNS)} — say which holds "
            "the prompts"
        )
    if isinstance(column, int) and not isinstance(column, bool):
        if not 0 <= column < len(header):
            raise ValueError(f"{name}={column}: {path} has {len(header)} columns {header}")
        return column
    if isinstance(column, str) and column.strip().lower() in lower:
        return lower.index(column.strip().lower())
    raise ValueError(f"{name}={column!r}: not a column of {path}; columns: {header}")


def _table_column(path: Path, column: str | int | None, name: str, delimiter: str | None) -> list[tuple[int, str]]:
    """(line number, cell) of a CSV/TSV column."""
    header, rows = _rows(path, delimiter)
    j = _column_index(header, column, path, name)
    out = []
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) > len(header):
            raise ValueError(
                f"prompts: {path} line {line} has {len(row)} cells but the header {header} has {len(header)}; is the "
                f"delimiter right? (got {delimiter or 'the default'!r}; tab-separated files need delimiter='\\t')"
            )
        if j >= len(row):
            raise ValueError(f"prompts: {path} line {line} has {len(row)} cells, expected column {header[j]!r}")
        out.append((line, row[j]))
    return out


def load_prompts(source: PromptSource, column: str | int | None = None, delimiter: str | None = None) -> list[str]:
    """The prompts of ``source`` (see the module docstring); ValueError naming the file, line or column when the
    source is missing, empty, or has an empty prompt."""
    if isinstance(source, (list, tuple)):
        from distilled_decoding.text import check_prompts

        if column is not None:
            raise ValueError(f"prompt_column={column!r}: only for a CSV/TSV file, the prompts were given as a list")
        prompts = check_prompts(list(source), "prompts")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}]: an empty prompt")
        return prompts
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"prompts: expected a list of strings or a path (.txt, .csv, .tsv, .json), got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"prompts: {path} does not exist (expected a .txt, .csv, .tsv or .json file of prompts)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        cells = _table_column(path, column, "prompt_column", delimiter)
        for line, cell in cells:
            if not cell.strip():
                raise ValueError(f"prompts: {path} line {line}: empty prompt")
        prompts = [cell.strip() for _, cell in cells]
    elif suffix == ".json":
        if column is not None:
            raise ValueError(f"prompt_column={column!r}: only for a CSV/TSV file, {path} is JSON")
        prompts = _json_prompts(path)
    else:
        if column is not None:
            raise ValueError(f"prompt_column={column!r}: only for a CSV/TSV file, {path} is read one prompt a line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompts")
    return prompts


def _json_prompts(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts: {path} is not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions
        items = [a.get("caption") if isinstance(a, dict) else None for a in data["annotations"]]
        where = "annotations[{}].caption"
    elif isinstance(data, list):
        items, where = data, "[{}]"
    else:
        raise ValueError(f"prompts: {path}: expected a JSON list of strings or COCO caption annotations")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: {path} {where.format(i)}: expected a non-empty string, got {p!r}")
    return [p.strip() for p in items]


def load_prompt_labels(source: str | os.PathLike, column: str | int, delimiter: str | None = None) -> torch.Tensor:
    """Integer labels (P,) long from ``column`` of a CSV/TSV prompt file, one per prompt of :func:`load_prompts`
    (rows in the same order), e.g. the digit each caption names."""
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"label_column: labels are read from a CSV/TSV prompt file, got {path}")
    cells = _table_column(path, column, "label_column", delimiter)
    try:
        return torch.tensor([int(cell) for _, cell in cells], dtype=torch.long)
    except ValueError as e:
        raise ValueError(f"label_column={column!r}: {path} holds a non-integer label ({e})") from e
