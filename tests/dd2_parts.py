"""Shared parts of the DD2 training tests (LlamaGen and VAR): a short GTS + CSD run (2 iterations of regression warm
start, performance alignment at 3) as a subprocess on a tiny teacher of either family (:data:`tests.conftest.
TINY_TEACHERS`), killed or not, and the saved weights it leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

#: the teacher's sampling in these runs
SAMPLING = {"cfg_scale": 2.0, "top_k": 32}
#: each family's tiny AR-diffusion settings (LlamaGen fits a residual input MLP; VAR reads vectors as they are)
INPUT_HIDDEN = {"llamagen": 128, "var": 0}
TEACHER_SEED = 5

_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from tests.conftest import TINY_TEACHERS
from distilled_decoding.dd2_config import CSDConfig, GTSConfig
from distilled_decoding.dd2_training import train_csd, train_gts
from distilled_decoding.sampling import sample_tokens
family, out, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
teacher, cb = TINY_TEACHERS[family]({seed})
sampling = {sampling!r}
labels = torch.arange(32) % 10
tokens = sample_tokens(teacher, labels, generator=torch.Generator().manual_seed(1), **sampling)
noise = torch.randn(32, tokens.shape[1], cb.shape[1], generator=torch.Generator().manual_seed(2))
pairs = torch.utils.data.StackDataset(noise=noise, tokens=tokens, condition_id=labels)
small = dict(batch_size=4, draws=2, save_every=2, progress=False, sampling=sampling)
gts, _ = train_gts(GTSConfig(output_dir=out + "/gts", max_steps=4, head_width=32, head_depth=1,
                             input_hidden={input_hidden!r}[family], **small), teacher, cb, tokens, labels)
gen, guide, _ = train_csd(CSDConfig(output_dir=out + "/csd", max_iters=iters, guidance_steps=2, align_at=3,
                                    align_guidance_steps=2, warmup_guidance_steps=4, regression_iters=2,
                                    regression_weight=0.5, **small), teacher, cb, gts, pairs=pairs)
import accelerate
if accelerate.PartialState().is_main_process:
    gts.save_pretrained(out + "/gts/final")
    gen.save_pretrained(out + "/csd/generator")
    guide.save_pretrained(out + "/csd/guidance")
"""


def write_script(tmp_path: Path) -> Path:
    """The training script (argv: family, output folder, CSD iterations), written into ``tmp_path``."""
    script = tmp_path / "train_dd2.py"
    script.write_text(_SCRIPT.format(root=str(ROOT), seed=TEACHER_SEED, sampling=SAMPLING, input_hidden=INPUT_HIDDEN))
    return script


def script_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_dd2_script(tmp_path: Path, family: str, out: Path, iters: int, kill_at: Path | None = None) -> None:
    """Run the script to the end (asserting success), or SIGKILL it as soon as ``kill_at`` exists."""
    script = write_script(tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), family, str(out), str(iters)], env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    if kill_at is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        return
    deadline = time.time() + 600
    while time.time() < deadline and not kill_at.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """The weights a ``save_pretrained`` folder holds."""
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


PARTS = ("gts/final", "csd/generator", "csd/guidance")


def assert_killed_run_resumes(tmp_path: Path, family: str) -> Path:
    """SIGKILL during CSD (after its second checkpoint, before the end; performance alignment at iteration 3); started
    again, GTS resumes at its end and CSD from its last complete checkpoint: GTS model, generator (EMA) and guidance
    weights equal an uninterrupted run's bit for bit, and the generator trained. Returns the uninterrupted run's
    folder."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_dd2_script(tmp_path, family, full, 6)
    run_dd2_script(tmp_path, family, killed, 6, kill_at=killed / "csd" / "checkpoints" / "checkpoint_1" / "COMPLETE")
    assert (killed / "csd" / "checkpoints" / "checkpoint_1").exists() and not (killed / "csd" / "generator").exists()
    run_dd2_script(tmp_path, family, killed, 6)
    for part in PARTS:
        a, b = saved_state(full / part), saved_state(killed / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    gen = saved_state(full / "csd" / "generator")
    init = saved_state(full / "gts" / "final")
    assert max(float((gen[k] - init[k]).abs().max()) for k in gen if gen[k].shape == init[k].shape) > 1e-4
    return full


def assert_two_processes_equal_one(tmp_path: Path, family: str, port: int) -> None:
    """GTS then CSD (with performance alignment) on 2 CPU processes (accelerate launch) give the weights of 1
    process (≤ 1e-5)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_dd2_script(tmp_path, family, one, 4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(write_script(tmp_path)), family, str(two), "4"]  # fmt: skip
    res = subprocess.run(cmd, env={**script_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for part in PARTS:
        a, b = saved_state(one / part), saved_state(two / part)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < 1e-5, (part, diff)


def sampling_loop_and_one_forward(teacher: Any, codebook: torch.Tensor, sampling: dict) -> tuple[torch.Tensor, ...]:
    """Sample 4 sequences with ``sampling``, recording the logits the KV-cache loop handed its chooser; → (those
    logits (4, N, V), :class:`TeacherScore`'s logits of the finished sequences from one forward, tokens, labels),
    after checking the two agree (the same −inf pattern, finite entries within float32 noise)."""
    from distilled_decoding.sampling import MultinomialChooser, sample_tokens
    from distilled_decoding.teacher_score import TeacherScore

    seen = []

    class Recorder(MultinomialChooser):
        def __call__(self, logits, positions):
            seen.append(logits.clone())
            return super().__call__(logits, positions)

    labels = torch.tensor([0, 3, 7, 9])
    tokens = sample_tokens(teacher, labels, chooser=Recorder(torch.Generator().manual_seed(0)), **sampling)
    loop = torch.cat(seen, dim=1)
    once = TeacherScore(teacher, codebook, **sampling).logits(tokens, labels)
    assert once.shape == loop.shape == (4, teacher.seq_len, teacher.vocab_size)
    assert torch.equal(torch.isinf(loop), torch.isinf(once))
    fin = torch.isfinite(loop)
    assert torch.allclose(loop[fin], once[fin], atol=1e-4, rtol=1e-5)
    return loop, once, tokens, labels
