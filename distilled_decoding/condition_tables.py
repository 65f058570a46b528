"""Condition tables: what a trajectory sample's integer ``condition_id`` stands for.

A trajectory folder stores one integer per sample — a class id, or the index of a prompt — and a *table* that turns
ids into what the teacher and the student take. The table is chosen by the condition spec's kind
(:meth:`~distilled_decoding.conditions.ConditionSpec.describe`), so the builder and the reader never branch on the
condition type:

* :class:`ClassTable` (``kind="class"``) — ids are the class ids themselves; nothing is stored besides them;
* :class:`PromptTable` (``kind="text"``) — ids index a list of prompts (``prompts.json`` in the folder); the caption
  features of each *distinct* prompt are computed once by the text encoder and kept in a
  :class:`~distilled_decoding.text.PromptEmbeddingCache` (``prompt_embeddings/``, safetensors), never per sample.

Interface: ``num_ids``, ``ids_name`` (the builder's argument for given ids), ``settings()`` (JSON identity for the
manifest), ``lookup(ids)`` (the condition value of a batch, for the teacher), ``item(i)`` (the per-sample fields the
dataset returns; the spec's ``from_batch`` reads them back after collation), ``prepare(folder)`` (write what the
reader needs; run once, by the main process) and ``load(folder, settings)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.conditions import TextCondition

__all__ = ["ClassTable", "PromptTable", "condition_table", "load_condition_table", "PROMPTS_FILE", "EMBEDDINGS_DIR"]

PROMPTS_FILE = "prompts.json"
EMBEDDINGS_DIR = "prompt_embeddings"


class ClassTable:
    """Class ids ``0 .. num_classes − 1``: the id is the condition."""

    kind = "class"
    ids_name = "class_labels"

    def __init__(self, num_classes: int):
        self.num_ids = int(num_classes)

    @classmethod
    def for_spec(cls, spec: Any, prompts: Any = None, text_encoder: Any = None, folder: Any = None) -> ClassTable:
        if prompts is not None or text_encoder is not None:
            arg = "prompts" if prompts is not None else "text_encoder"
            raise ValueError(
                f"{arg}: the teacher is class-conditional (class ids in [0, {spec.num_classes})); prompts need a "
                "text-conditional teacher (LlamaGen model_type='t2i')"
            )
        return cls(spec.num_classes)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_ids}

    def lookup(self, ids: Tensor) -> Tensor:
        return ids.long()

    def item(self, i: int) -> dict[str, Tensor]:
        return {"class_label": torch.tensor(int(i))}

    def prepare(self, folder: Path) -> None:
        pass

    @classmethod
    def load(cls, folder: Path, settings: dict[str, Any]) -> ClassTable:
        return cls(settings["num_classes"])


class PromptTable:
    """Prompts by index and their caption features, read from a :class:`PromptEmbeddingCache`.

    ``lookup(ids)`` → TextCondition (B, length, width), left-padded; ``item(i)`` → ``caption_features`` (length,
    width) float32 and ``caption_mask`` (length,) bool. Features are read lazily and the most recent
    ``memory`` prompts kept in memory.
    """

    kind = "text"
    ids_name = "prompt_indices"

    def __init__(self, prompts: Sequence[str], cache: Any, length: int, width: int, memory: int = 65536):
        self.prompts, self.cache, self.length, self.width = list(prompts), cache, int(length), int(width)
        self.num_ids = len(self.prompts)
        self._memory, self._features = memory, {}

    @classmethod
    def for_spec(cls, spec: Any, prompts: Any = None, text_encoder: Any = None, folder: Any = None) -> PromptTable:
        from distilled_decoding.prompts import load_prompts
        from distilled_decoding.text import PromptEmbeddingCache

        if prompts is None:
            raise ValueError(
                "prompts: the teacher is text-conditional; give prompts (a list, or a .txt / .csv / .tsv / .json file) "
                "and the text_encoder its caption features come from"
            )
        if text_encoder is None:
            raise ValueError("text_encoder: the teacher is text-conditional; give the T5TextEncoder of its features")
        if text_encoder.feature_dim != spec.width:
            raise ValueError(
                f"text_encoder: features of width {text_encoder.feature_dim}, but the teacher's caption_dim is "
                f"{spec.width}"
            )
        if text_encoder.max_length != spec.length:
            raise ValueError(
                f"text_encoder: max_length={text_encoder.max_length} caption tokens, but the teacher has "
                f"{spec.length} caption positions (cls_token_num); load it with max_length={spec.length}"
            )
        source = prompts if isinstance(prompts, (str, os.PathLike, list, tuple)) else list(prompts)
        cache = PromptEmbeddingCache(Path(folder) / EMBEDDINGS_DIR, text_encoder)
        return cls(load_prompts(source), cache, spec.length, spec.width)

    def settings(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()
        return {"kind": self.kind, "num_prompts": self.num_ids, "prompts_sha256": digest,
                "encoder": self.cache.identity, "length": self.length, "width": self.width}  # fmt: skip

    def prepare(self, folder: Path) -> None:
        """Write ``prompts.json`` and encode every distinct prompt not yet in the cache (main process only)."""
        tmp = Path(folder) / (PROMPTS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.prompts, ensure_ascii=False, indent=0))
        os.replace(tmp, Path(folder) / PROMPTS_FILE)
        self.cache.features(list(dict.fromkeys(self.prompts)))

    def lookup(self, ids: Tensor) -> TextCondition:
        from distilled_decoding.text import pad_features

        wanted = [int(i) for i in ids]
        missing = sorted(set(wanted) - set(self._features))
        if missing:  # one read for the batch
            for i, f in zip(missing, self.cache.features([self.prompts[i] for i in missing])):
                self._features[i] = f.float()
        batch = pad_features([self._features[i] for i in wanted], self.length)
        while len(self._features) > self._memory:  # forget the oldest prompts
            self._features.pop(next(iter(self._features)))
        return batch

    def item(self, i: int) -> dict[str, Tensor]:
        cond = self.lookup(torch.tensor([int(i)]))
        return {"caption_features": cond.features[0], "caption_mask": cond.mask[0]}

    @classmethod
    def load(cls, folder: Path, settings: dict[str, Any]) -> PromptTable:
        from distilled_decoding.text import PromptEmbeddingCache

        path = Path(folder) / PROMPTS_FILE
        try:
            prompts = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: missing or corrupt prompt list ({e})") from e
        if hashlib.sha256(json.dumps(prompts).encode()).hexdigest() != settings["prompts_sha256"]:
            raise ValueError(f"{path}: the prompt list differs from the one the trajectories were built with")
        cache = PromptEmbeddingCache(Path(folder) / EMBEDDINGS_DIR, identity=settings["encoder"])
        return cls(prompts, cache, settings["length"], settings["width"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features": {}}


_TABLES = {"class": ClassTable, "text": PromptTable}


def condition_table(spec: Any, prompts: Any = None, text_encoder: Any = None, folder: Any = None) -> Any:
    """The table for a teacher's condition ``spec``: class ids, or ``prompts`` encoded by ``text_encoder`` into the
    cache under ``folder``. ValueError naming the argument when they do not fit the spec."""
    return _TABLES[spec.describe()["kind"]].for_spec(spec, prompts, text_encoder, folder)


def load_condition_table(folder: str | os.PathLike, settings: dict[str, Any]) -> Any:
    """The table a trajectory folder was built with (``settings`` = its manifest's ``settings["condition"]``)."""
    kind = settings.get("kind")
    if kind not in _TABLES:
        raise ValueError(f"{folder}: unknown condition kind {kind!r} in the manifest; expected {sorted(_TABLES)}")
    return _TABLES[kind].load(Path(folder), settings)
