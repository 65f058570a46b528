"""The one KV-cache autoregressive sampling loop, shared by every teacher, and its token choosers.

The loop drives any :class:`~distilled_decoding.teachers.base.Teacher` (``decode_groups``, ``guidance_scales``,
``begin``, ``advance``, ``condition``, ``token_order``) step by step. Guidance, temperature, top-k and top-p are
applied by :func:`guide` and :func:`temper_and_filter` (the only implementation, also used by the skip-n
baseline), then a *token chooser* picks the tokens: :class:`MultinomialChooser` (ordinary sampling with a seeded
``torch.Generator``), :class:`GreedyChooser`, or :class:`FlowChooser` (the deterministic flow map of Distilled
Decoding: noise → token).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "TokenChooser",
    "MultinomialChooser",
    "GreedyChooser",
    "FlowChooser",
    "filter_logits",
    "guide",
    "temper_and_filter",
    "to_tokenizer_order",
    "sample_tokens",
    "validate_sampling_args",
]


class TokenChooser(Protocol):
    def __call__(self, logits: Tensor, positions: slice) -> Tensor:
        """logits (B, n, V) float32, already guided, tempered and filtered (−inf = excluded) for the token
        positions ``positions`` of the sequence → chosen token ids (B, n) long."""


class MultinomialChooser:
    """Draw each token from softmax(logits) with ``generator`` (the global RNG when None)."""

    def __init__(self, generator: torch.Generator | None = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def __call__(self, logits: Tensor, positions: slice) -> Tensor:
        b, n, v = logits.shape
        probs = torch.softmax(logits, dim=-1).view(b * n, v)
        return torch.multinomial(probs, 1, generator=self.generator).view(b, n)


class GreedyChooser:
    """The most likely token (``sample_logits=False`` in the official sampler)."""

    def __call__(self, logits: Tensor, positions: slice) -> Tensor:
        return logits.argmax(dim=-1)


class FlowChooser:
    """Distilled Decoding's token chooser: token i is the flow map of noise[:, i] under the teacher's p_i.

    ``noise`` (B, N, D) standard normal, ``codebook`` (V, D) (the tokenizer's vectors, l2-normalised for
    LlamaGen VQ). Extra keyword arguments go to :func:`distilled_decoding.flow.noise_to_tokens`.
    """

    def __init__(self, noise: Tensor, codebook: Tensor, **flow_kwargs: Any):
        if not isinstance(codebook, Tensor) or codebook.ndim != 2 or not codebook.dtype.is_floating_point:
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ValueError(f"codebook: expected a (V, D) float tensor, got {got}")
        if not isinstance(noise, Tensor) or noise.ndim != 3 or noise.shape[-1] != codebook.shape[-1]:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(
                f"noise: expected shape (B, N, {codebook.shape[-1]}) matching the codebook dimension, got {got}"
            )
        if not noise.dtype.is_floating_point:
            raise ValueError(f"noise: expected a floating dtype (standard normal values), got {noise.dtype}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise: contains NaN or inf values; expected finite standard normal noise")
        self.noise, self.codebook, self.flow_kwargs = noise, codebook, flow_kwargs

    def check(self, batch: int, positions: int) -> None:
        """Called by :func:`sample_tokens` before the first step: the noise must cover every position decoded."""
        if self.noise.shape[0] != batch or self.noise.shape[1] < positions:
            raise ValueError(
                f"noise: shape {tuple(self.noise.shape)} does not cover the batch and sequence being decoded; "
                f"expected ({batch}, >= {positions}, {self.noise.shape[2]})"
            )

    def __call__(self, logits: Tensor, positions: slice) -> Tensor:
        from distilled_decoding.flow import noise_to_tokens

        eps = self.noise[:, positions].to(device=logits.device, dtype=torch.float32)
        return noise_to_tokens(eps, logits, self.codebook.to(logits.device), **self.flow_kwargs)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then top-p (nucleus) filtering over the last dim, as the official LlamaGen sampler does
    (HF v3.2 semantics: ties at the k-th value are kept; the first token past ``top_p`` is kept).
    Returns a new tensor with excluded entries set to −inf."""
    v = logits.shape[-1]
    if top_k > 0 and top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def validate_sampling_args(
    *, cfg_scale: float, temperature: float, top_k: int, top_p: float, vocab_size: int | None = None
) -> None:
    """Raise ValueError naming the first invalid sampling argument (NaN, inf and bools are invalid too)."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not number(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale={cfg_scale!r}: expected a finite number >= 0")
    if not number(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: expected an integer >= 0 (0 disables top-k)")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1] (1 disables top-p)")


def guide(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance on fp32 logits: ``uncond + (cond − uncond)·scale`` (``cond`` itself for scale 1)."""
    if not isinstance(scale, Tensor) and scale == 1.0:
        return cond
    return uncond + (cond - uncond) * scale


def temper_and_filter(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k / top-p filtering (official order); excluded entries become −inf."""
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = filter_logits(logits, top_k, top_p)
    return logits


def to_tokenizer_order(tokens: Tensor, order: Tensor | None) -> Tensor:
    """Tokens (B, N, ...) in a teacher's sequence order → the tokenizer's order (``order``: the teacher's
    ``token_order``, the tokenizer index of each sequence position; None = identity)."""
    if order is None:
        return tokens
    out = torch.empty_like(tokens)
    out[:, order.to(tokens.device)] = tokens
    return out


@torch.no_grad()
def sample_tokens(
    teacher: Any,
    condition: Any,
    *,
    chooser: TokenChooser | None = None,
    generator: torch.Generator | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prefix: Tensor | None = None,
    stop: int | None = None,
    order: str = "tokenizer",
    progress: bool = False,
) -> Tensor:
    """Autoregressive decoding with a static KV cache. Returns tokens (B, N) long (N = teacher.seq_len).

    Args:
        teacher: a :class:`~distilled_decoding.teachers.base.Teacher` (LlamaGen, VAR, ...).
        condition: what the teacher is conditioned on — class ids (B,) long for class-conditional teachers.
        chooser: token chooser; default :class:`MultinomialChooser` with ``generator``.
        cfg_scale, cfg_interval: classifier-free guidance (semantics of the teacher's official sampler).
        temperature, top_k, top_p: applied after guidance, in this order (official order).
        prefix: (B, T) long tokens to continue from, in the teacher's sequence order; T must end a decoding step
            (any T for LlamaGen, a scale boundary for VAR). The result starts with the prefix.
        stop: decode only the positions < stop (a step boundary; default N). Returns (B, stop) then.
        order: ``"tokenizer"`` returns the tokens in the tokenizer's order (ready for its decoder), ``"sequence"``
            in the teacher's decoding order (the order of Distilled Decoding's noise and trajectories); the same
            for teachers that decode in raster / scale order.
        progress: show a tqdm bar over decoding steps.
    """
    if not callable(getattr(teacher, "decode_groups", None)) or not callable(getattr(teacher, "begin", None)):
        raise TypeError(f"teacher: expected a model implementing the decoding protocol, got {type(teacher).__name__}")
    validate_sampling_args(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    if order not in ("tokenizer", "sequence"):
        raise ValueError(f"order={order!r}: expected 'tokenizer' or 'sequence'")
    spec = teacher.condition
    device = _device(teacher)
    condition = spec.to(spec.check(condition), device)
    b = spec.batch_size(condition)
    groups = teacher.decode_groups()
    n_tokens = teacher.seq_len
    t0 = 0
    starts = [g[0] for g in groups] + [n_tokens]
    if prefix is not None:
        teacher.check_tokens(prefix, "prefix", max_len=n_tokens)
        if prefix.shape[0] != b:
            raise ValueError(f"prefix: expected batch size {b} (as the condition), got {prefix.shape[0]}")
        t0 = prefix.shape[1]
        if t0 not in starts:
            raise ValueError(f"prefix: length {t0} does not end a decoding step; expected one of {_few(starts)}")
    stop = n_tokens if stop is None else stop
    if isinstance(stop, bool) or not isinstance(stop, int) or stop not in starts or stop < t0:
        raise ValueError(f"stop={stop}: expected a decoding-step boundary >= the prefix length {t0}: {_few(starts)}")
    token_order = teacher.token_order
    if order == "tokenizer" and token_order is not None and stop != n_tokens:
        raise ValueError(f"stop={stop}: a partial sequence exists in the teacher's decoding order only; pass "
                         "order='sequence'")  # fmt: skip
    if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int):
        raise ValueError(f"cfg_interval={cfg_interval!r}: expected an int (-1: guidance at every step)")
    if chooser is not None and not callable(chooser):
        raise TypeError(f"chooser: expected a token chooser (callable), got {type(chooser).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    check = getattr(chooser, "check", None)  # e.g. FlowChooser: its noise must cover the positions decoded
    if callable(check):
        check(b, stop)
    scales = teacher.guidance_scales(cfg_scale, cfg_interval)
    guided = condition if scales is None else spec.with_unconditional(condition)
    chooser = chooser if chooser is not None else MultinomialChooser(generator)
    out = torch.empty(b, stop, dtype=torch.long, device=device)
    if prefix is not None:
        prefix = prefix.to(device)
        out[:, :t0] = prefix
    if t0 < stop:
        pre = prefix if prefix is None or scales is None else torch.cat([prefix, prefix])
        state, logits = teacher.begin(guided, pre)
        first = next(i for i, g in enumerate(groups) if g[0] == t0)
        last = next(i for i, g in enumerate(groups) if g[1] == stop)
        for g in tqdm(range(first, last + 1), desc="decoding", leave=False, disable=not progress):
            start, end = groups[g]
            if scales is not None:
                logits = guide(logits[:b], logits[b:], scales[g])
            logits = temper_and_filter(logits, temperature, top_k, top_p)
            tok = chooser(logits, slice(start, end))
            out[:, start:end] = tok
            if g < last:
                logits = teacher.advance(state, tok if scales is None else torch.cat([tok, tok]))
    return to_tokenizer_order(out, token_order) if order == "tokenizer" else out


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def _few(values: list[int]) -> str:
    return str(values[:12])[:-1] + (", ...]" if len(values) > 12 else "]")
