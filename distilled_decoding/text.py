"""Text encoders for text-to-image teachers, and the prompt-embedding cache.

LlamaGen's T2I models read FLAN-T5-XL features (``language/t5.py``, ``T5Embedder``): the prompt is tokenized with
``max_length=120, padding="max_length", truncation=True, add_special_tokens=True`` (so a long prompt keeps its
first 119 tokens and the closing ``</s>``), ``T5EncoderModel`` returns ``last_hidden_state`` (B, 120, 2048) with
the tokenizer's attention mask, and ``sample_t2i.py`` moves the real tokens to the end (left padding) and zeroes
the padding before the GPT sees them: :meth:`TextCondition.from_padded`. The official embedder runs in bfloat16
(``--precision bf16``); here the dtype is the caller's choice (float32 by default).

Differences from the official embedder, on purpose: a prompt longer than ``max_length`` tokens is truncated as
there, **but with a warning** (the official code truncates silently); and the text clean-up is a parameter
(``preprocess``). LlamaGen applies PixArt's ``clean_caption`` twice (URL/HTML removal with ftfy + BeautifulSoup,
punctuation rules, lower case); the default here is :func:`lowercase_strip`, the official embedder's path without
that clean-up (``text.lower().strip()``), which gives the same text for most plain prompts; pass your own
function to reproduce the full clean-up (the official one runs in training, ``extract_t5_feature.py``, too).

:class:`PromptEmbeddingCache` stores each distinct prompt's features once (safetensors files in a folder, keyed
by a hash of the prompt and of the encoder's identity), so that trajectories and students can refer to prompts by
index instead of storing features per sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.conditions import TextCondition

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "lowercase_strip",
    "check_prompts",
    "tokenize_prompts",
    "encode_prompts",
    "pad_features",
    "T5TextEncoder",
    "PromptEmbeddingCache",
]

#: LlamaGen's number of caption tokens (``--t5-feature-max-len 120`` = the GPT's ``cls_token_num``).
DEFAULT_MAX_LENGTH = 120
_CACHE_FORMAT = "distilled_decoding.prompt_embeddings/1"


def lowercase_strip(text: str) -> str:
    """The official T5Embedder's preprocessing without caption clean-up: ``text.lower().strip()``."""
    return text.lower().strip()


def check_prompts(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    """A list of prompt strings (a single string becomes a list of one); ValueError for an empty list or a
    non-string entry."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise ValueError(f"{name}: expected a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name}: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
    return list(prompts)


def tokenize_prompts(
    prompts: str | Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    preprocess: Callable[[str], str] | None = lowercase_strip,
) -> tuple[Tensor, Tensor]:
    """Tokenize as LlamaGen's ``T5Embedder.get_text_embeddings``: ``(input_ids, attention_mask)``, both
    (B, max_length) long, padded to ``max_length``. Prompts longer than ``max_length`` tokens (``</s>`` included)
    are truncated to their first ``max_length - 1`` tokens + ``</s>``, with a UserWarning naming them."""
    prompts = check_prompts(prompts)
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r}: expected a positive integer")
    texts = [preprocess(p) for p in prompts] if preprocess is not None else prompts
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if long:
        shown = ", ".join(f"#{i} ({n} tokens)" for i, n in long[:5]) + (", ..." if len(long) > 5 else "")
        warnings.warn(
            f"prompts: {len(long)} prompt(s) longer than max_length={max_length} tokens are truncated to "
            f"{max_length} (as LlamaGen's T5 embedder does): {shown}",
            UserWarning,
            stacklevel=4,  # the caller of T5TextEncoder.encode
        )
    batch = tokenizer(
        texts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


def encode_prompts(
    prompts: str | Sequence[str],
    text_encoder: Any,
    tokenizer: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    preprocess: Callable[[str], str] | None = lowercase_strip,
) -> TextCondition:
    """Caption features of ``prompts`` through ``text_encoder`` (a ``transformers`` ``T5EncoderModel``) and its
    ``tokenizer``: a TextCondition with features (B, max_length, d_model) in the encoder's dtype and device,
    left-padded with zeros as LlamaGen's sampler feeds its GPT."""
    ids, mask = tokenize_prompts(prompts, tokenizer, max_length=max_length, preprocess=preprocess)
    device = next(text_encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    return TextCondition.from_padded(hidden, mask.bool())


def pad_features(features: Sequence[Tensor], length: int, dtype: torch.dtype | None = None) -> TextCondition:
    """Left-pad per-prompt features (n_i, C) (the real tokens, in order) to a TextCondition (B, length, C), zeros and
    mask False in the padding, as LlamaGen's sampler feeds its GPT; ValueError when a prompt has over ``length``."""
    if not features:
        raise ValueError("features: expected at least one prompt's features")
    width = features[0].shape[-1]
    out = torch.zeros(len(features), length, width, dtype=dtype or features[0].dtype)
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        n = f.shape[0]
        if n > length or f.ndim != 2 or f.shape[1] != width:
            raise ValueError(f"features[{i}]: expected (n <= {length}, {width}), got {tuple(f.shape)}")
        out[i, length - n :] = f
        mask[i, length - n :] = True
    return TextCondition(out, mask)


class T5TextEncoder:
    """A FLAN-T5 encoder and its tokenizer, used as LlamaGen's ``T5Embedder`` (120 tokens, left-padded features).

    ``T5TextEncoder.from_pretrained("google/flan-t5-xl")`` (Hub id) or a local folder holding both the model and
    the tokenizer (e.g. one written by :meth:`save_pretrained`). ``encode(prompts)`` → TextCondition with features
    (B, max_length, d_model). Prompts over ``max_length`` tokens are truncated with a warning.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        preprocess: Callable[[str], str] | None = lowercase_strip,
    ):
        if not hasattr(getattr(model, "config", None), "d_model"):
            raise ValueError(f"model: expected a transformers T5EncoderModel, got {type(model).__name__}")
        if not callable(tokenizer):
            raise ValueError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive integer (LlamaGen: 120)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.preprocess = max_length, preprocess

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        preprocess: Callable[[str], str] | None = lowercase_strip,
        **kwargs: Any,
    ) -> T5TextEncoder:
        """Load ``T5EncoderModel`` and ``AutoTokenizer`` from a Hub id (``"google/flan-t5-xl"``) or a folder.

        ``tokenizer`` is where the tokenizer lives when not beside the model. ``kwargs`` go to
        ``T5EncoderModel.from_pretrained`` (e.g. ``revision``, ``cache_dir``, ``local_files_only``).
        """
        from transformers import AutoTokenizer, T5EncoderModel

        src, tok_src = str(name_or_path), str(tokenizer if tokenizer is not None else name_or_path)
        for arg, value in (("name_or_path", src), ("tokenizer", tok_src)):
            if _looks_like_path(value) and not Path(value).exists():
                raise ValueError(f"{arg}: folder {value} does not exist (expected a Hub id or a saved folder)")
        try:
            tok = AutoTokenizer.from_pretrained(tok_src)
            model = T5EncoderModel.from_pretrained(src, dtype=torch_dtype, **kwargs)
        except OSError as e:
            raise OSError(
                f"name_or_path={src!r}: cannot load a T5 encoder and its tokenizer ({str(e).splitlines()[0]}). "
                "Pass a Hub id such as 'google/flan-t5-xl' or a folder written by save_pretrained."
            ) from e
        if device is not None:
            model = model.to(device)
        return cls(model, tok, max_length=max_length, preprocess=preprocess)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the encoder (safetensors) and the tokenizer to ``directory`` (loadable by from_pretrained)."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def feature_dim(self) -> int:
        """The features' width C (``d_model``: 2048 for FLAN-T5-XL) = the teacher's ``caption_dim``."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), both (B, max_length) long; see :func:`tokenize_prompts`."""
        return tokenize_prompts(prompts, self.tokenizer, max_length=self.max_length, preprocess=self.preprocess)

    def encode(self, prompts: str | Sequence[str]) -> TextCondition:
        """Prompts → TextCondition: features (B, max_length, d_model) left-padded with zeros, mask (B, max_length)."""
        return encode_prompts(
            prompts, self.model, self.tokenizer, max_length=self.max_length, preprocess=self.preprocess
        )

    @cached_property
    def identity(self) -> str:
        """A hex digest of what decides the features: the encoder's architecture, a fingerprint of every weight
        tensor (name, shape, dtype and the exact bytes of up to 4096 evenly strided entries), the tokenizer (class,
        size, ids of a probe text), ``max_length`` and ``preprocess``. Independent of where the files were loaded
        from and of the device; computed once (modify the weights in place and the identity is stale)."""
        cfg = self.model.config
        arch = {k: getattr(cfg, k, None) for k in _T5_ARCH_FIELDS}
        h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, t in sorted(self.model.state_dict().items()):
                flat = t.detach().flatten()
                sample = flat[:: max(1, flat.numel() // 4096)][:4096].cpu().contiguous()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(sample.view(torch.uint8).numpy().tobytes())
        probe = self.tokenizer(["A red bus, 2 cats & a dog. Ünïcode!"], add_special_tokens=True)["input_ids"]
        tok = [type(self.tokenizer).__name__, len(self.tokenizer), [list(map(int, x)) for x in probe]]
        pre = None if self.preprocess is None else f"{self.preprocess.__module__}.{self.preprocess.__qualname__}"
        h.update(json.dumps([tok, self.max_length, pre]).encode())
        return h.hexdigest()


_T5_ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "feed_forward_proj",
    "layer_norm_epsilon",
)


def _looks_like_path(value: str) -> bool:
    """True for what cannot be a Hub id ("org/name"): absolute or ./ ~ paths, or more than one "/"."""
    return value.startswith((".", "~")) or os.path.isabs(value) or value.count("/") > 1


class PromptEmbeddingCache:
    """Caption features computed once per distinct prompt and kept in ``directory`` as safetensors files.

    Each entry holds the features of the prompt's real tokens only, (n, C) in the encoder's dtype, under the key
    ``sha256(encoder.identity, prompt)``; a file's metadata records the encoder identity and the prompts. Files of
    other encoders in the same folder are ignored; nothing is ever deleted. ``encode(prompts)`` returns the same
    TextCondition as ``encoder.encode(prompts)`` (left-padded, zeros in the padding), computing only the prompts
    not stored yet (a prompt over ``max_length`` tokens warns when it is first encoded, and is stored truncated).
    Several processes may fill one folder: each writes its own files, atomically.
    """

    def __init__(self, directory: str | os.PathLike, encoder: T5TextEncoder | None = None, *,
                 identity: str | None = None):  # fmt: skip
        """``encoder`` computes missing prompts; without one (``identity`` = the :attr:`T5TextEncoder.identity` of
        the encoder that filled the folder) the cache only reads: :meth:`features` of stored prompts."""
        if encoder is None and not isinstance(identity, str):
            raise ValueError("encoder: a PromptEmbeddingCache needs the text encoder, or identity= to read only")
        self.directory, self.encoder = Path(directory), encoder
        self.identity: str = encoder.identity if encoder is not None else identity
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"directory: {self.directory} exists and is not a folder")
        if encoder is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise ValueError(f"directory: {self.directory} does not exist (no cached prompt embeddings)")
        self._index: dict[str, Path] = {}
        self.computed = 0  # number of prompts run through the encoder by this object
        self.refresh()

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{prompt}".encode()).hexdigest()

    def refresh(self) -> None:
        """Re-read the folder's files (e.g. ones another process wrote)."""
        from safetensors import SafetensorError, safe_open

        for path in sorted(self.directory.glob("*.safetensors")):
            if path in self._index.values():
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") == _CACHE_FORMAT and meta.get("encoder") == self.identity:
                        self._index.update({k: path for k in f.keys()})  # noqa: SIM118
            except (SafetensorError, OSError) as e:
                raise ValueError(
                    f"{path}: not a readable safetensors file ({e}); move it out of {self.directory}"
                ) from e

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and self.key(prompt) in self._index

    def encode(self, prompts: str | Sequence[str], *, batch_size: int = 64) -> TextCondition:
        """TextCondition of ``prompts`` (B, max_length, C) on the encoder's device; prompts not stored yet are
        encoded ``batch_size`` at a time (each distinct prompt once) and written to a new file."""
        if self.encoder is None:
            raise ValueError("encoder: this cache was opened to read only (no text encoder); use features()")
        feats = self.features(prompts, batch_size=batch_size)
        return pad_features(feats, self.encoder.max_length, dtype=self.encoder.dtype).to(self.encoder.device)

    def features(self, prompts: str | Sequence[str], *, batch_size: int = 64) -> list[Tensor]:
        """The stored features of each prompt's real tokens, (n_i, C) on the CPU; prompts not stored yet are encoded
        ``batch_size`` at a time (each distinct prompt once), or, without an encoder, raise ValueError naming them."""
        prompts = check_prompts(prompts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        keys = [self.key(p) for p in prompts]
        if any(k not in self._index for k in keys):
            self.refresh()
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in self._index))
        if missing and self.encoder is None:
            shown = ", ".join(repr(p[:40]) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(
                f"prompts: {len(missing)} prompt(s) have no embedding in {self.directory} for encoder "
                f"{self.identity[:12]}: {shown}"
            )
        for s in range(0, len(missing), batch_size):
            self._store(missing[s : s + batch_size])
        feats = self._load(list(dict.fromkeys(keys)))
        return [feats[k] for k in keys]

    def _store(self, prompts: list[str]) -> None:
        from safetensors.torch import save_file

        cond = self.encoder.encode(prompts)
        self.computed += len(prompts)
        tensors, names = {}, {}
        for i, p in enumerate(prompts):
            k = self.key(p)
            tensors[k] = cond.features[i, cond.mask[i]].detach().to("cpu").contiguous()
            names[k] = p
        digest = hashlib.sha256("".join(sorted(tensors)).encode()).hexdigest()[:16]
        path = self.directory / f"prompts-{digest}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = {"format": _CACHE_FORMAT, "encoder": self.identity, "prompts": json.dumps(names)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self._index.update({k: path for k in tensors})

    def _load(self, keys: list[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._index[k], []).append(k)
        out = {}
        for path, ks in by_file.items():
            with safe_open(str(path), "pt") as f:
                out.update({k: f.get_tensor(k) for k in ks})
        return out
