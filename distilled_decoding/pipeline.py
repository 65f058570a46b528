"""``DistilledDecodingPipeline``: a distilled student plus its tokenizer's decoder, as a diffusers pipeline.

::

    dd = DistilledDecodingPipeline.from_pretrained(repo_id_or_dir)
    images = dd.generate(noise, class_labels, steps=1)           # (B, 3, H, W) float in [0, 1]
    images = dd.generate(noise, steps=1, generator=g)            # classes drawn uniformly with g
    images = dd.generate(noise, class_labels, steps=2)
    images = dd.generate(noise, class_labels, steps=2, teacher=gpt, teacher_tokens=(60, 80))   # refined
    out = dd(class_labels=[3, 7], num_inference_steps=1, generator=g)   # ImagePipelineOutput, .images = PIL

    # text-to-image students (distilled from a LlamaGen T2I teacher): the pipeline holds the text encoder
    out = dd(prompt=["a red bus on a street"], num_inference_steps=1, generator=g)
    images = dd.generate(noise, prompt=["a handwritten seven"], steps=2)
    images = dd.generate(noise, prompt_embeds=dd.encode_prompt(["a handwritten seven"]), steps=1)

Teacher-refined sampling: one student step from pure noise, keep its first T tokens, let the teacher regenerate
tokens T..t₂−1 through the flow map *with the same noise* (so the image stays a deterministic function of the
noise; ``teacher_sampling="random"`` reproduces the official variant, which samples those tokens at random),
then one student step at t₂. Steps: 1 + (t₂ − T) + 1 (no first step when T = 0).

Saved with ``save_pretrained`` as ``model_index.json`` + ``student/`` + ``tokenizer/`` (+ ``text_encoder/`` and
``text_tokenizer/`` for text-to-image students; safetensors only) and a generated model card — only those files are
written, each atomically, nothing else in the folder is touched; ``from_pretrained`` takes a folder or a Hub repo id
(offline from the HF cache too). A teacher passed for refinement must have the weights the student was distilled
from (sha256, re-checked when the weights change).

Prompts: the text encoder (a ``transformers`` ``T5EncoderModel``, FLAN-T5-XL for LlamaGen's T2I models) and its
tokenizer turn prompts into caption features as LlamaGen does (:mod:`distilled_decoding.text`: ``max_length`` = the
student's caption positions, 120 for LlamaGen; a longer prompt is truncated **with a warning**; left padding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

from distilled_decoding.provenance import teacher_weights_sha256

__all__ = ["DistilledDecodingPipeline"]


class DistilledDecodingPipeline(DiffusionPipeline):
    """Components: ``student`` (a :mod:`~distilled_decoding.students` student), ``tokenizer`` (the teacher's
    image tokenizer, e.g. :class:`~distilled_decoding.tokenizers.vq.VQTokenizer`; only its decoder is used), and for
    text-conditional students ``text_encoder`` (``transformers.T5EncoderModel``) and ``text_tokenizer`` (its
    tokenizer) — None for class-conditional ones (diffusers' optional components).

    ``info`` (saved in ``model_index.json``): provenance shown in the model card — the teacher's identity and
    sampling settings (used by teacher-refined sampling), the trajectory settings and measured metrics.
    """

    model_cpu_offload_seq = "text_encoder->student->tokenizer"
    _optional_components = ["text_encoder", "text_tokenizer"]

    def __init__(self, student: Any, tokenizer: Any, text_encoder: Any = None, text_tokenizer: Any = None,
                 info: dict | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(student=student, tokenizer=tokenizer, text_encoder=text_encoder,
                              text_tokenizer=text_tokenizer)  # fmt: skip
        self.register_to_config(info=info or {})
        if student is not None and tokenizer is not None:
            self._check_components()

    def _check_components(self) -> None:
        cb_student, cb_tok = self.student.codebook, self.tokenizer.codebook
        if tuple(cb_student.shape) != tuple(cb_tok.shape) or not torch.allclose(
            cb_student.float().cpu(), cb_tok.float().cpu(), atol=1e-6
        ):
            raise ValueError(
                f"tokenizer: its codebook {tuple(cb_tok.shape)} differs from the one the student was trained with "
                f"{tuple(cb_student.shape)}"
            )
        width = self.student.condition.describe().get("width")  # caption features' width; None: class-conditional
        if (self.text_encoder is None) != (self.text_tokenizer is None):
            raise ValueError("text_encoder, text_tokenizer: give both (the T5 encoder and its tokenizer) or neither")
        if self.text_encoder is not None and width is None:
            raise ValueError("text_encoder: the student is class-conditional and takes no text; pass text_encoder=None")
        d_model = getattr(getattr(self.text_encoder, "config", None), "d_model", None)
        if self.text_encoder is not None and d_model != width:
            raise ValueError(
                f"text_encoder: features of width {d_model}, but the student reads caption features of width {width}"
            )

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return dict(self.config.get("info") or {})

    @property
    def noise_shape(self) -> tuple[int, int]:
        """(N, D): tokens per image and codebook dimension of the student's input noise."""
        return (self.student.seq_len, int(self.student.config.codebook_dim))

    # -- conditions ----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str]) -> Any:
        """Prompts → the student's caption features (a TextCondition (B, P, C) on the text encoder's device), as
        LlamaGen's T5 embedder computes them; a prompt over P tokens is truncated with a warning."""
        from distilled_decoding.text import T5TextEncoder, check_prompts

        if self.text_encoder is None:
            raise ValueError(
                "prompt: this pipeline's student is class-conditional (no text encoder); pass class_labels instead"
            )
        prompt = check_prompts(prompt, "prompt")
        length = self.student.condition.describe()["length"]
        return T5TextEncoder(self.text_encoder, self.text_tokenizer, max_length=length).encode(prompt)

    def prepare_condition(
        self,
        class_labels: Tensor | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        prompt_embeds: Any = None,
        batch: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        """The student's condition from at most one of ``class_labels`` (B,), ``prompt`` (strings) or
        ``prompt_embeds`` (a TextCondition, e.g. :meth:`encode_prompt`'s), validated for ``batch`` rows (None: any)
        and on the student's device; none: ``batch`` conditions drawn with ``generator`` (class ids; a
        text-conditional student needs prompts). ValueError naming the argument when it does not fit the student."""
        given = {k: v for k, v in (("class_labels", class_labels), ("prompt", prompt), ("prompt_embeds", prompt_embeds))
                 if v is not None}  # fmt: skip
        text = self.text_encoder is not None
        if not given and batch is not None:
            return self.student.condition.draw(batch, generator, self.student.codebook.device)
        if len(given) != 1:
            want = "prompt (or prompt_embeds)" if text else "class_labels"
            got = " and ".join(given) if given else "none"
            raise ValueError(f"{want}: give exactly one condition (class_labels, prompt or prompt_embeds); got {got}")
        (name, value), spec = next(iter(given.items())), self.student.condition
        if name == "prompt":
            value = self.encode_prompt(value)
        elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
            value = torch.tensor(value, dtype=torch.long)
        if isinstance(value, str):
            raise TypeError(f"{name}: got the string {value!r}; prompts go in prompt=")
        value = spec.check(value, batch, name=name)
        return spec.to(value, self.student.codebook.device)

    # -- sampling ------------------------------------------------------------------------------------------------
    def sampler(
        self,
        steps: int = 1,
        *,
        teacher: Any = None,
        teacher_tokens: tuple[int, int] | None = None,
        teacher_sampling: str = "flow",
        generator: torch.Generator | None = None,
    ) -> Any:
        """The :mod:`~distilled_decoding.samplers` object behind :meth:`generate`: DD ``steps``-step sampling, or
        teacher-refined sampling when ``teacher`` is given (its sampling settings and flow map are the ones the
        student was distilled with, recorded in ``info``)."""
        from distilled_decoding.samplers import RefinedSampler, StudentSampler

        if teacher is None:
            if teacher_tokens is not None:
                raise ValueError("teacher_tokens: given without a teacher; pass teacher= as well")
            return StudentSampler(self.student, steps)
        sampler = RefinedSampler(self.student, teacher, teacher_tokens, teacher_sampling,
                                 sampling=dict(self.info.get("teacher_sampling") or {}),
                                 flow=dict(self.info.get("flow") or {}), generator=generator)  # fmt: skip
        self._check_teacher(teacher)
        return sampler

    def student_samplers(self, teacher: Any = None, refine: tuple[int, int] | None = None) -> list[Any]:
        """The student's rows of tables and benchmarks: 1-step; with two timesteps 2-step and (with ``teacher``)
        refined ``refine`` = (T, t₂) (default (t₂ − max(1, t₂ // 4), t₂)); a one-step student (DD2) gets, with
        ``teacher``, two refined rows where the teacher regenerates its last N // 4 and N // 2 steps (DD2's Alg. 4;
        ``refine`` = (T, N) picks one)."""
        out = [self.sampler(1)]
        timesteps = list(self.student.config.timesteps)
        if len(timesteps) > 1:
            t2 = timesteps[-1]
            out.append(self.sampler(2))
            tails = [refine or (t2 - max(1, t2 // 4), t2)]
        else:
            n = self.student.num_steps
            tails = [refine] if refine else [(n - max(1, n // 4), n), (n - max(1, n // 2), n)]
        if teacher is not None:
            out += [self.sampler(teacher=teacher, teacher_tokens=tuple(tt)) for tt in tails]
        return out

    @torch.no_grad()
    def generate(
        self,
        noise: Tensor,
        class_labels: Tensor | Sequence[int] | None = None,
        steps: int = 1,
        *,
        prompt: str | Sequence[str] | None = None,
        prompt_embeds: Any = None,
        teacher: Any = None,
        teacher_tokens: tuple[int, int] | None = None,
        teacher_sampling: str = "flow",
        generator: torch.Generator | None = None,
        return_tokens: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """noise (B, N, D) standard normal and the condition — ``class_labels`` (B,), or for a text-conditional
        student ``prompt`` (B strings) or ``prompt_embeds`` (a TextCondition of B rows) — → images (B, 3, H, W)
        float in [0, 1].

        ``class_labels`` omitted for a class-conditional student: B classes drawn uniformly from [0, num_classes)
        with ``generator`` (``torch.randint`` on the generator's device, the CPU when None), so
        ``generate(noise, steps=1)`` works and is reproducible with a seeded generator.
        ``steps=1`` samples at t = 0; ``steps=2`` at the student's timesteps (e.g. (0, 80)). With ``teacher`` and
        ``teacher_tokens=(T, t2)`` the teacher regenerates tokens T..t2−1 between the two student steps (t2 = N: the
        teacher finishes the sequence — DD2's Alg. 4, the refinement of one-step DD2 generators)
        (``teacher_sampling="flow"``: through the flow map with the same noise; ``"random"``: multinomial with
        ``generator``). Returns ``images``, then the final tokens (B, N) if ``return_tokens``, then the condition
        (class labels (B,) or the caption features) if ``return_labels``.
        """
        self._check_call(noise, generator)
        condition = self.prepare_condition(class_labels, prompt, prompt_embeds, batch=noise.shape[0],
                                           generator=generator)  # fmt: skip
        return self.generate_from_condition(noise, condition, steps, teacher=teacher, teacher_tokens=teacher_tokens,
                                            teacher_sampling=teacher_sampling, generator=generator,
                                            return_tokens=return_tokens, return_labels=return_labels)  # fmt: skip

    @torch.no_grad()
    def generate_from_condition(
        self,
        noise: Tensor,
        condition: Any,
        steps: int = 1,
        *,
        teacher: Any = None,
        teacher_tokens: tuple[int, int] | None = None,
        teacher_sampling: str = "flow",
        generator: torch.Generator | None = None,
        return_tokens: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """:meth:`generate` with the condition already in the student's form (:meth:`prepare_condition`)."""
        student = self.student
        self._check_call(noise, generator)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps={steps!r}: expected an int (1 or {len(student.config.timesteps)})")
        if teacher_sampling not in ("flow", "random"):
            raise ValueError(f"teacher_sampling={teacher_sampling!r}: expected 'flow' or 'random'")
        condition = student.condition.to(student.condition.check(condition, noise.shape[0]), student.codebook.device)
        noise = noise.to(device=student.codebook.device, dtype=student.codebook.dtype)
        sampler = self.sampler(steps, teacher=teacher, teacher_tokens=teacher_tokens,
                               teacher_sampling=teacher_sampling, generator=generator)  # fmt: skip
        vectors, tokens = sampler(noise, condition)
        images = self.decode(vectors)
        out = (images, *((tokens,) if return_tokens else ()), *((condition,) if return_labels else ()))
        return out if len(out) > 1 else images

    def _check_call(self, noise: Any, generator: Any) -> None:
        """TypeError / ValueError naming ``generator`` or ``noise`` (a finite float (B, N, D) tensor, B >= 1)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(noise, Tensor):
            n, d = self.noise_shape
            raise TypeError(f"noise: expected a (B, {n}, {d}) float tensor, got {type(noise).__name__}")
        self.student.check_noise(noise)

    def _check_teacher(self, teacher: Any) -> None:
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher: expected the teacher model (an nn.Module), got {type(teacher).__name__}")
        s = self.student
        want = {"vocab_size": s.config.vocab_size, "seq_len": s.seq_len, "condition": s.condition.describe()}
        got = {"vocab_size": getattr(teacher, "vocab_size", None), "seq_len": getattr(teacher, "seq_len", None),
               "condition": teacher.condition.describe() if hasattr(teacher, "condition") else None}  # fmt: skip
        if got != want:
            diff = ", ".join(f"{k} {got[k]} (student {want[k]})" for k in want if got[k] != want[k])
            raise ValueError(f"teacher: does not match the student it would refine: {diff}")
        expected = (self.info.get("teacher") or {}).get("weights_sha256")
        if expected:
            cached = teacher_weights_sha256(teacher)
            if cached != expected:
                raise ValueError(
                    f"teacher: its weights (sha256 {cached[:12]}) are not those of the teacher this student was "
                    f"distilled from (sha256 {expected[:12]})"
                )

    def decode(self, vectors: Tensor) -> Tensor:
        """Codebook-space vectors (B, N, D) in the student's sequence order → images (B, 3, H, W) in [0, 1] through
        the tokenizer's decoder."""
        from distilled_decoding.sampling import to_tokenizer_order

        vectors = to_tokenizer_order(vectors, self.student.token_order)
        images = self.tokenizer.decode_vectors(vectors.to(self.tokenizer.dtype))
        return images.float().clamp(-1, 1).add(1).div(2)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor | None = None,
        num_inference_steps: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        noise: Tensor | None = None,
        teacher: Any = None,
        teacher_tokens: tuple[int, int] | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        prompt_embeds: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """diffusers-style entry point: one image per class label, prompt or row of ``prompt_embeds``; draws the noise
        with ``generator`` (on the CPU, so results do not depend on the device) and returns
        ``ImagePipelineOutput(images=...)`` as PIL images (``output_type="pil"``), a float array in [0, 1] of shape
        (B, H, W, 3) (``"np"``) or a tensor (B, 3, H, W) (``"pt"``)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np' or 'pt'")
        if class_labels is not None and not isinstance(class_labels, (str, Tensor)):
            class_labels = torch.as_tensor(class_labels).reshape(-1)
        condition = self.prepare_condition(class_labels, prompt, prompt_embeds, generator=generator)
        if noise is None:
            gen_device = generator.device if generator is not None else "cpu"
            b = self.student.condition.batch_size(condition)
            noise = torch.randn((b, *self.noise_shape), generator=generator, device=gen_device)
        images = self.generate_from_condition(noise, condition, num_inference_steps, teacher=teacher,
                                              teacher_tokens=teacher_tokens, generator=generator)  # fmt: skip
        if output_type == "pt":
            out: Any = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    # -- saving ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """As ``DiffusionPipeline.from_pretrained``, after importing the modules that define the components
        (``model_index.json`` names e.g. ``distilled_decoding.students.var.DDVARStudent`` and
        ``distilled_decoding.tokenizers.msvq.MultiScaleVQVAE``; diffusers only loads classes from modules that are
        already imported, and ``import distilled_decoding`` is lazy).

        A ``pathlib.Path``, an existing path, or a string that cannot be a Hub repo id (absolute, ``./``, more than
        one ``/``) is a local folder: it must exist and hold a ``model_index.json`` of this pipeline."""
        import distilled_decoding.students  # noqa: F401
        import distilled_decoding.tokenizers.msvq  # noqa: F401
        import distilled_decoding.tokenizers.vq  # noqa: F401

        _check_local_pipeline(pretrained_model_name_or_path, cls.__name__)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_release(cls, release: Any, **kwargs: Any) -> Any:
        """A released DD student (``"LlamaGen-DD-L"``, ``"VAR-DD-d16"``, ...) as a pipeline; see
        :func:`distilled_decoding.releases.load_release` (``teacher=True`` returns ``(pipeline, teacher)``)."""
        from distilled_decoding.releases import load_release

        return load_release(release, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the pipeline (safetensors only) and a model card ``README.md`` into ``save_directory``.

        Only the pipeline's own files are written (``model_index.json``, ``README.md``, ``student/``,
        ``tokenizer/``): each is staged inside the folder, then moved into place with an atomic rename (the
        ``model_index.json`` last), so an interrupted save leaves the previous pipeline readable. Nothing else in
        the folder is touched — saving into a job folder or into ``"."`` is safe; only files that the previous
        save recorded in its ``model_index.json`` and this one did not write are removed."""
        from distilled_decoding.fileio import StagedFolder

        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"save_directory: expected a folder path, got {type(save_directory).__name__}")
        kwargs.pop("safe_serialization", None)
        with StagedFolder(save_directory, record="model_index.json") as stage:
            super().save_pretrained(stage.path, safe_serialization=True, **kwargs)
            (stage.path / "README.md").write_text(self.model_card())
            stage.commit()

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload distilled-decoding pipeline",
                    private: bool | None = None, token: str | None = None) -> str:  # fmt: skip
        """Save to a temporary folder and upload it in one commit (creating the repo if needed)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        with tempfile.TemporaryDirectory() as d:
            self.save_pretrained(Path(d) / "pipe")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(d) / "pipe"), commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    def model_card(self) -> str:
        """A model card (YAML front matter + markdown) describing the teacher, data, schedule and metrics."""
        info = self.info
        s = self.student.config
        teacher = info.get("teacher") or {}
        metrics = info.get("metrics") or {}
        n_params = sum(p.numel() for p in self.student.parameters())
        text = self.text_encoder is not None
        usage = "dd(prompt=['a red bus on a street'], num_inference_steps=1)" if text else \
            "dd(class_labels=[0, 1], num_inference_steps=1)"  # fmt: skip
        lines = [
            "---",
            "library_name: distilled-decoding",
            f"pipeline_tag: {'text-to-image' if text else 'unconditional-image-generation'}",
            "tags: [image-generation, distillation, autoregressive, distilled-decoding]",
            "license: mit",
            "---",
            "",
            f"# {self.student.method_name} student ({info.get('name', 'class-conditional')})",
            "",
            f"{len(s.timesteps) > 1 and 'One- and two-step' or 'One-step'} generator distilled from an image "
            f"autoregressive teacher with {_PAPERS.get(self.student.method_name, self.student.method_name)}. Load it "
            "with the `distilled-decoding` toolkit:",
            "",
            "```python",
            "from distilled_decoding import DistilledDecodingPipeline",
            "dd = DistilledDecodingPipeline.from_pretrained('<this repo or folder>')",
            f"images = {usage}.images",
            "```",
            "",
            "## Teacher",
            f"- class: {teacher.get('class', '?')}; weights sha256 `{str(teacher.get('weights_sha256', '?'))[:16]}`",
            f"- config: `{json.dumps(teacher.get('config', {}), sort_keys=True)}`",
            f"- sampling distilled: `{json.dumps(info.get('teacher_sampling', {}), sort_keys=True)}`, "
            f"flow map `{json.dumps(info.get('flow', {}), sort_keys=True)}`",
            "",
            "## Student",
            f"- {type(self.student).__name__}: {n_params / 1e6:.2f}M parameters, N = {self.student.seq_len} tokens, "
            f"codebook {s.vocab_size} × {s.codebook_dim}",
            f"- timesteps (training and few-step schedule): {list(s.timesteps)}; first position read from the "
            f"continuous head: {self.student.split_position}",
            f"- condition: `{json.dumps(self.student.condition.describe(), sort_keys=True)}`"
            + (
                f"; text encoder {type(self.text_encoder).__name__} (d_model {self.text_encoder.config.d_model})"
                if text
                else ""
            ),
            f"- trajectories: {json.dumps(info.get('trajectories', {}), sort_keys=True)}",
            f"- training: {json.dumps(info.get('training', {}), sort_keys=True)}",
            "",
            "## Measured",
        ]
        if metrics:
            keys = sorted({k for row in metrics.values() for k in row})
            lines.append("| sampler | " + " | ".join(keys) + " |")
            lines.append("|---|" + "---|" * len(keys))
            for name, row in metrics.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
        else:
            lines.append("No metrics recorded.")
        return "\n".join(lines) + "\n"


#: the paper of each student's method (model cards)
_PAPERS = {"DD": "Distilled Decoding (Liu et al., arXiv 2412.17153)", "DD2": "Distilled Decoding 2 (arXiv 2510.21003)"}


def _check_local_pipeline(path: Any, name: str) -> None:
    """Clear errors for a local pipeline folder that is missing or is not a pipeline folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path: expected a folder path or a Hub repo id, got "
                        f"{type(path).__name__}")  # fmt: skip
    text = os.fspath(path)
    local = (
        isinstance(path, os.PathLike)
        or os.path.exists(text)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )
    if not local:
        return
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained_model_name_or_path: {folder} is not a folder (no saved pipeline there)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; not a saved {name} folder")
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("_class_name") != name:
        found = data.get("_class_name") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{index}: describes a {found!r} pipeline, not a {name}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
