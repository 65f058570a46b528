"""Distilled Decoding 2: the teacher's closed-form conditional score, the GTS / CSD losses, the networks, the trainers,
the recipe (``distill.method: dd2``) and the pipeline.

The teacher score is checked against Monte Carlo: simulate (x0 ~ p, ε ~ N(0, I)), x_t = (1 − t) x0 + t ε, and for
balls A around a few points compare E[x0 | x_t ∈ A] with E[x̂0(x_t) | x_t ∈ A] (equal by the tower property, so no
binning bias), and likewise the score E[−ε/t | A] and the velocity E[ε − x0 | A]; tolerances are 5 standard errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import StackDataset

from distilled_decoding import DDStudent, LlamaGen, VQTokenizer
from distilled_decoding.configs import ConfigError
from distilled_decoding.dd2_config import CSDConfig
from distilled_decoding.dd2_training import train_csd
from distilled_decoding.flow import denoise, posterior_mean
from distilled_decoding.losses import (
    csd_generator_loss,
    draw_times_and_noise,
    gts_loss,
    guidance_loss,
    regression_loss,
)
from distilled_decoding.sampling import sample_tokens
from distilled_decoding.students.dd2 import ARDiffusion, DD2Generator
from distilled_decoding.teacher_score import TeacherScore, teacher_logits

from .conftest import TINY_GPT, TINY_TEACHERS, TINY_VQ, randomize_
from .dd2_parts import (
    SAMPLING,
    TEACHER_SEED,
    assert_killed_run_resumes,
    assert_two_processes_equal_one,
    sampling_loop_and_one_forward,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "distill_llamagen.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def _codebook(v: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(v, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def teacher():
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=5).eval()
    return gpt, _codebook(64, 8, 11)


# ----------------------------------------------------------------------------------------------------------
# teacher score
# ----------------------------------------------------------------------------------------------------------
def test_posterior_mean_equals_the_flow_maps_denoiser():
    cb = _codebook(40, 8, 0)
    g = torch.Generator().manual_seed(1)
    x, lp = torch.randn(64, 8, generator=g), torch.randn(64, 40, generator=g) * 2
    lp[:, ::3] = float("-inf")
    for t in (0.03, 0.3, 0.9, 1.0):
        assert torch.allclose(posterior_mean(x, t, lp, cb), denoise(x, t, lp, cb), atol=1e-5, rtol=1e-5)
    # one t per row, and broadcasting of log p over draws (B, m, D) with (B, 1, V)
    ts = torch.rand(64, 3, generator=g) * 0.9 + 0.05
    xs = torch.randn(64, 3, 8, generator=g)
    got = posterior_mean(xs, ts, lp[:, None], cb)
    for j in range(3):
        for r in (0, 17, 63):
            want = denoise(xs[r, j], float(ts[r, j]), lp[r], cb)
            assert torch.allclose(got[r, j], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="t: every entry"):
        posterior_mean(x, 0.0, lp, cb)


@pytest.mark.parametrize("t", [0.15, 0.5, 0.85])
def test_teacher_score_matches_monte_carlo(t):
    """Small codebook (V = 6, D = 2), p with one code excluded (top-k): x̂0, score and velocity vs simulation."""
    v, d, n = 6, 2, 400_000
    cb = _codebook(v, d, 3)
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, float("-inf"), -1.0])
    g = torch.Generator().manual_seed(10)
    j = torch.multinomial(logits.softmax(-1), n, replacement=True, generator=g)
    x0, eps = cb[j], torch.randn(n, d, generator=g)
    x_t = (1 - t) * x0 + t * eps
    lp = logits.expand(n, v)
    ts = TeacherScore.__new__(TeacherScore)  # the formulas alone, without a teacher
    ts.codebook = cb
    hat, score, vel = ts.x0(x_t, t, lp), ts.score(x_t, t, lp), ts.velocity(x_t, t, lp)
    centres = torch.cat([(1 - t) * cb[[0, 1, 3]], torch.zeros(1, d), (1 - t) * (cb[0:1] + cb[3:4]) / 2])
    checked = 0
    for c in centres:
        inside = (x_t - c).norm(dim=-1) < 0.25 * max(t, 0.2)
        k = int(inside.sum())
        if k < 2000:
            continue
        checked += 1
        for sim, formula in ((x0, hat), (-eps / t, score), (eps - x0, vel)):
            diff = (sim - formula)[inside]  # E[diff | A] = 0 by the tower property
            se = diff.std(0) / k**0.5
            assert bool((diff.mean(0).abs() <= 5 * se + 1e-4).all()), (t, c, diff.mean(0), se)
    assert checked >= 3
    # a wrong score (the codes' plain mean instead of the posterior) is rejected by the same check
    wrong = cb[:4].mean(0).expand_as(x0)
    inside = (x_t - centres[0]).norm(dim=-1) < 0.25 * max(t, 0.2)
    diff = (x0 - wrong)[inside]
    assert bool((diff.mean(0).abs() > 5 * diff.std(0) / int(inside.sum()) ** 0.5 + 1e-4).any())


def test_teacher_logits_are_the_sampling_loops_logits(teacher):
    """One teacher forward over the finished sequence gives, at every position, what sample_tokens handed its
    chooser (CFG, temperature, top-k, top-p)."""
    gpt, cb = teacher
    _, _, tokens, labels = sampling_loop_and_one_forward(
        gpt, cb, {"cfg_scale": 2.5, "temperature": 0.9, "top_k": 20, "top_p": 0.9}
    )
    # cfg_interval: per-position scales, 1 (unguided: bit-exactly the conditional logits) after the interval
    plain = teacher_logits(gpt, tokens, labels)
    late = teacher_logits(gpt, tokens, labels, cfg_scale=2.5, cfg_interval=3)
    assert torch.equal(late[:, 5:], plain[:, 5:]) and not torch.allclose(late[:, :5], plain[:, :5])
    with pytest.raises(ValueError, match="tokens: expected whole sequences"):
        teacher_logits(gpt, tokens[:, :5], labels)
    with pytest.raises(ValueError, match=r"sampling: unknown key\(s\) \['cfg'\]"):
        TeacherScore(gpt, cb, cfg=2.0)
    with pytest.raises(ValueError, match=r"codebook: expected \(64, D\)"):
        TeacherScore(gpt, cb[:10])


# ----------------------------------------------------------------------------------------------------------
# networks and losses
# ----------------------------------------------------------------------------------------------------------
def _model(gpt, cb, head_base: str = "none") -> ARDiffusion:
    return ARDiffusion.from_teacher(gpt, cb, head_base=head_base, head_width=32, head_depth=1, input_hidden=128)


def _batch(gpt, b: int = 4, seed: int = 0):
    labels = torch.arange(b) % gpt.num_classes
    tokens = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(seed), cfg_scale=2.0)
    t, eps = draw_times_and_noise(torch.Generator().manual_seed(seed), b, gpt.seq_len, 3, 8)
    return tokens, labels, t, eps


def test_continuous_input_and_posterior_head_reproduce_the_teacher(teacher):
    """The fitted continuous input reads codebook vectors as the teacher reads token ids, and the posterior head
    (copied logits head + closed-form posterior) is then the teacher's exact x̂0: GTS loss 0 against the unguided
    teacher. The MLP head starts at u = 0 (x̂0 = x_t) and has a positive loss; gradients reach what they should."""
    gpt, cb = teacher
    tokens, labels, t, eps = _batch(gpt)
    exact = _model(gpt, cb, "posterior")
    assert exact.input_fit_error < 1e-3
    with torch.no_grad():
        f = exact.features(cb[tokens], labels)
        assert torch.allclose(exact.output(f), gpt.logits_from_prefix(tokens[:, :-1], labels), atol=1e-3)
    plain = teacher_logits(gpt, tokens, labels)
    assert float(gts_loss(exact, tokens, labels, plain, t, eps)["gts"]) < 1e-8
    guided = teacher_logits(gpt, tokens, labels, cfg_scale=2.0)
    loss = gts_loss(exact, tokens, labels, guided, t, eps)["total"]
    assert float(loss.detach()) > 1e-4  # CFG is not in the teacher's conditional logits: the GTS stage must learn it
    loss.backward()
    assert exact.output.weight.grad.abs().max() > 0 and exact.layers[0].attention.wqkv.weight.grad.abs().max() > 0
    mlp = _model(gpt, cb, "none")
    out = gts_loss(mlp, tokens, labels, guided, t, eps)
    assert out["total"].shape == () and float(out["total"].detach()) > 1e-2
    out["total"].backward()
    assert mlp.head.final.weight.grad.abs().max() > 0


def test_csd_loss_vanishes_when_the_guidance_is_the_teacher(teacher):
    """α = 1 SiD loss: with the guidance network equal to the teacher's score (posterior head, unguided teacher)
    loss, divergence and generator gradient are 0; with a guided teacher they are not. The guidance network's
    parameters never receive gradients from the generator loss; the guidance loss trains them."""
    gpt, cb = teacher
    init = _model(gpt, cb, "posterior")
    gen = DD2Generator.from_ar_diffusion(init)
    guide = _model(gpt, cb, "posterior")
    _, labels, t, eps = _batch(gpt)
    noise = torch.randn(4, gpt.seq_len, 8, generator=torch.Generator().manual_seed(3))
    other = csd_generator_loss(gen, guide, TeacherScore(gpt, cb, cfg_scale=3.0), noise, labels, t, eps)
    other["total"].backward()
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    big = max(float(g.abs().max()) for g in grads)
    assert float(other["div"]) > 1e-4 and all(torch.isfinite(g).all() for g in grads) and big > 1e-3
    gen.zero_grad()
    same = csd_generator_loss(gen, guide, TeacherScore(gpt, cb), noise, labels, t, eps)
    same["total"].backward()
    assert abs(float(same["total"].detach())) < 1e-6 and float(same["div"]) < 1e-9
    assert max(float(p.grad.abs().max()) for p in gen.parameters() if p.grad is not None) < 0.01 * big
    assert all(p.grad is None for p in guide.parameters()) and all(p.requires_grad for p in guide.parameters())
    with torch.no_grad():
        x_g = gen(noise, labels)
    dsm = guidance_loss(guide, x_g, labels, t, eps)
    dsm["total"].backward()
    assert dsm["total"].shape == () and guide.head.final.weight.grad.abs().max() > 0


def test_euler_sampler_kv_cache_matches_full_recompute(teacher):
    gpt, cb = teacher
    model = _model(gpt, cb, "posterior").eval()
    noise = torch.randn(3, gpt.seq_len, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4, 8])
    vectors, tokens = model.sample(noise, labels, steps=10)
    assert torch.equal(vectors, cb[tokens])
    with torch.no_grad():
        f = model.features(cb[tokens], labels)  # features of the finished sequence, no cache
        x = noise.clone()
        grid = [1.0 - k / 10 for k in range(10)] + [0.0]
        for t, s in zip(grid[:-1], grid[1:]):
            x0 = model.denoise(f, x, t)
            x = x0 if s == 0.0 else x + (x0 - x) * ((t - s) / t)
    assert torch.equal((x[..., None, :] - cb).square().sum(-1).argmin(-1), tokens)
    with pytest.raises(ValueError, match="steps=0"):
        model.sample(noise, labels, steps=0)


def test_generator_is_a_one_step_student(teacher, tmp_path):
    """Save/load round trip; tokens = the nearest codes of the continuous output; t > 0 refused; a DD2 generator
    folder is refused by DDStudent.from_pretrained and a DD student folder by DD2Generator's (naming the file)."""
    gpt, cb = teacher
    gen = DD2Generator.from_ar_diffusion(_model(gpt, cb), generator_t=0.5).eval()
    noise, labels = torch.randn(2, gpt.seq_len, 8), torch.tensor([0, 5])
    vectors, tokens = gen.sample(noise, labels)
    with torch.no_grad():
        x = gen(noise, labels)
    assert torch.equal(tokens, (x[..., None, :] - cb).square().sum(-1).argmin(-1)) and torch.equal(vectors, cb[tokens])
    gen.save_pretrained(tmp_path / "g")
    back = DD2Generator.from_pretrained(tmp_path / "g").eval()
    assert type(back) is DD2Generator and back.config.generator_t == 0.5
    assert torch.equal(back.sample(noise, labels)[1], tokens)
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 16, 8\)"):
        back.sample(noise[:, :4], labels)
    with pytest.raises(ValueError, match="t: a DD2 generator samples from pure noise only"):
        back.predict(noise, labels, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"g/config.json: holds a DD2Generator, not a DDStudent"):
        DDStudent.from_pretrained(tmp_path / "g")
    DDStudent.from_teacher(gpt, cb).save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match=r"s/config.json: holds a DDStudent, not a DD2Generator"):
        DD2Generator.from_pretrained(tmp_path / "s")
    with pytest.raises(ConfigError, match="timesteps"):
        DD2Generator(**{**dict(back.config), "timesteps": (0, 8)})
    with pytest.raises(TypeError, match="model: expected an ARDiffusion"):
        DD2Generator.from_ar_diffusion(gen)


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_dd2_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL during CSD, started again: the weights of an uninterrupted run bit for bit (:mod:`tests.dd2_parts`);
    a run with other settings does not resume these checkpoints."""
    full = assert_killed_run_resumes(tmp_path, "llamagen")
    with pytest.raises(ValueError, match="saved by a run with other training settings"):
        gpt, cb = TINY_TEACHERS["llamagen"](TEACHER_SEED)
        init_model = ARDiffusion.from_pretrained(full / "gts" / "final")
        train_csd(CSDConfig(output_dir=str(full / "csd"), max_iters=6, lr_generator=1e-3, progress=False,
                            sampling=SAMPLING), gpt, cb, init_model)  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_train_the_same_dd2_model(tmp_path):
    """GTS then CSD (with performance alignment) on 2 CPU processes (accelerate launch) give the weights of 1 process
    (the global batch is split; the random draws are the global batch's)."""
    assert_two_processes_equal_one(tmp_path, "llamagen", 29531)


def test_tiny_csd_runs_move_the_generator_to_the_teacher(teacher, tmp_path):
    """From the teacher-made AR-diffusion model (posterior head), 30 CSD iterations on three codebooks: the
    generator's first token, which starts as the posterior mean (nearly one code for every noise), spreads toward the
    teacher's p_0 — the total variation between the generated first tokens (2,000 noises) and p_0 falls in every run,
    by 0.15 on average."""
    gpt, _ = teacher
    sampling = {"cfg_scale": 2.0}
    drops = []
    for seed in range(3):
        cb = _codebook(64, 8, seed)
        init = _model(gpt, cb, "posterior")

        def tv_first(gen, cb=cb) -> float:
            labels = torch.full((2000,), 3)
            _, tok = gen.sample(torch.randn(2000, gpt.seq_len, 8, generator=torch.Generator().manual_seed(9)), labels)
            p0 = teacher_logits(gpt, tok[:1], labels[:1], **sampling)[0, 0].softmax(-1)
            hist = torch.bincount(tok[:, 0], minlength=gpt.vocab_size).float() / tok.shape[0]
            return 0.5 * float((hist - p0).abs().sum())

        tv0 = tv_first(DD2Generator.from_ar_diffusion(init).eval())
        cfg = CSDConfig(output_dir=str(tmp_path / f"csd{seed}"), max_iters=30, guidance_steps=2, batch_size=16,
                        save_every=0, warmup_guidance_steps=10, lr_generator=1e-3, lr_guidance=1e-3, progress=False,
                        sampling=sampling)  # fmt: skip
        gen, _, summary = train_csd(cfg, gpt, cb, init)
        assert summary["steps"] == 30 and summary["guidance_updates"] == 60
        drops.append(tv0 - tv_first(gen))
    assert min(drops) > 0.05 and sum(drops) / 3 > 0.15, drops


def test_a_finished_csd_run_can_be_extended(teacher, tmp_path):
    """max_iters is not a training setting: 3 iterations, then the same run with max_iters=5, ends with the weights
    of 5 uninterrupted iterations (generator EMA and guidance network); other settings are still refused."""
    gpt, cb = teacher
    init = _model(gpt, cb, "posterior")
    small = dict(batch_size=4, draws=2, guidance_steps=2, save_every=0, warmup_guidance_steps=2, progress=False,
                 sampling={"cfg_scale": 2.0})  # fmt: skip
    g5, d5, _ = train_csd(CSDConfig(output_dir=str(tmp_path / "one"), max_iters=5, **small), gpt, cb, init)
    train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=3, **small), gpt, cb, init)
    g, d, summary = train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=5, **small), gpt, cb, init)
    assert summary["steps"] == 5 and summary["guidance_updates"] == 10
    for a, b in ((g5, g), (d5, d)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="saved by a run with other training settings"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=6, **{**small, "guidance_steps": 3}), gpt,
                  cb, init)  # fmt: skip


def test_regression_warm_start_then_csd(teacher, tmp_path):
    """The regression settings: during the first ``regression_iters`` iterations only the generator trains (the
    guidance network keeps its initial weights, no guidance update) and its loss on the pairs falls; a run stopped at
    the end of the warm start and extended gives the weights of one run (CSD begins from the EMA weights on resume
    too); missing or mismatched pairs are refused naming ``pairs``."""
    gpt, cb = teacher
    init = _model(gpt, cb, "posterior")
    labels = torch.arange(16) % 10
    tokens = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    noise = torch.randn(16, gpt.seq_len, 8, generator=torch.Generator().manual_seed(2))
    pairs = StackDataset(noise=noise, tokens=tokens, condition_id=labels)
    small = dict(batch_size=4, draws=2, guidance_steps=2, save_every=0, warmup_guidance_steps=2, progress=False,
                 lr_generator=1e-3, regression_weight=0.5, sampling={"cfg_scale": 2.0})  # fmt: skip

    def reg(gen) -> float:
        with torch.no_grad():
            return float(regression_loss(gen, noise, labels, tokens)["reg"])

    before = reg(DD2Generator.from_ar_diffusion(init))
    g, d, summary = train_csd(CSDConfig(output_dir=str(tmp_path / "warm"), max_iters=20, regression_iters=20,
                                        **small), gpt, cb, init, pairs=pairs)  # fmt: skip
    assert summary["guidance_updates"] == 0 and reg(g) < 0.9 * before, (before, reg(g))
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), init.state_dict().values()))
    g5, d5, _ = train_csd(CSDConfig(output_dir=str(tmp_path / "one"), max_iters=5, regression_iters=3, **small), gpt,
                          cb, init, pairs=pairs)  # fmt: skip
    train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=3, regression_iters=3, **small), gpt, cb, init,
              pairs=pairs)  # fmt: skip
    g, d, summary = train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=5, regression_iters=3, **small),
                              gpt, cb, init, pairs=pairs)  # fmt: skip
    assert summary["steps"] == 5 and summary["guidance_updates"] == 4
    for a, b in ((g5, g), (d5, d)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match=r"pairs: regression_iters / regression_weight need the teacher's flow-map "
                       r"pairs .* with \(16, 8\) noise and \(16,\) tokens, got NoneType"):  # fmt: skip
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=5, regression_iters=3), gpt, cb, init)
    with pytest.raises(ValueError, match=r"pairs: .* got items \{'noise': \(16, 4\), 'tokens': \(16,\)\}"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=5, regression_weight=1.0), gpt, cb, init,
                  pairs=StackDataset(noise=noise[..., :4], tokens=tokens, condition_id=labels))  # fmt: skip
    stranger = StackDataset(noise=noise, tokens=tokens, condition_id=labels)
    stranger.root, stranger.teacher = "elsewhere/trajectories", {"class": "LlamaGen", "weights_sha256": "0" * 64}
    with pytest.raises(ValueError, match=r"pairs \(elsewhere/trajectories\): built by another teacher \(weights "
                       r"000000000000; given: LlamaGen weights"):  # fmt: skip
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=5, regression_weight=1.0), gpt, cb, init,
                  pairs=stranger)  # fmt: skip
    with pytest.raises(ValueError, match=r"align_at=2: expected null or an iteration in \[regression_iters"):
        CSDConfig(max_iters=5, regression_iters=3, align_at=2)
    assert not (tmp_path / "x").exists()
    # runs saved before the regression settings existed keep their settings (and resume)
    assert "regression_weight" not in CSDConfig().semantic()
    assert CSDConfig(max_iters=5, regression_iters=3).semantic()["regression_iters"] == 3


def test_an_unaligned_run_can_be_extended_with_performance_alignment(teacher, tmp_path):
    """3 iterations without alignment, then max_iters=5 with align_at=3: the weights of one run aligned at 3; an
    align_at that contradicts the checkpoint (passed without alignment, or a different alignment) is refused."""
    gpt, cb = teacher
    init = _model(gpt, cb, "posterior")
    small = dict(batch_size=4, draws=2, guidance_steps=2, save_every=0, warmup_guidance_steps=2, progress=False,
                 align_guidance_steps=2, sampling={"cfg_scale": 2.0})  # fmt: skip
    g5, d5, _ = train_csd(CSDConfig(output_dir=str(tmp_path / "one"), max_iters=5, align_at=3, **small), gpt, cb, init)
    train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=3, **small), gpt, cb, init)
    with pytest.raises(ValueError, match=r"align_at=2: the run in .* is at iteration 3 and was not aligned"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=5, align_at=2, **small), gpt, cb, init)
    g, d, summary = train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=5, align_at=3, **small), gpt, cb,
                              init)  # fmt: skip
    assert summary["guidance_updates"] == 3 * 2 + 2 + 2 * 2  # K = 2, the alignment's 2, then 2 after alignment
    for a, b in ((g5, g), (d5, d)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match=r"align_at=None: the run in .* was aligned at iteration 3"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "two"), max_iters=6, **small), gpt, cb, init)


def test_another_teacher_and_bad_settings_are_refused(teacher, tmp_path):
    gpt, cb = teacher
    other = randomize_(LlamaGen(**TINY_GPT), seed=77).eval()
    with pytest.raises(ValueError, match="teacher: its weights .* not those of the teacher the GTS model"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), other, cb, _model(gpt, cb))
    with pytest.raises(TypeError, match="init: expected an ARDiffusion"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), gpt, cb, gpt)
    with pytest.raises(TypeError, match="init: expected an ARDiffusion"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), gpt, cb, DDStudent.from_teacher(gpt, cb))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="align_at=5"):
        CSDConfig(max_iters=5, align_at=5)
    with pytest.raises(ValueError, match=r"sampling: unknown key\(s\) \['cfg'\]"):
        CSDConfig(sampling={"cfg": 2.0})
    with pytest.raises(ConfigError, match="head_base='mlp'"):
        ARDiffusion(**{**TINY_GPT_BACKBONE, "head_base": "mlp"})


_BACKBONE = ("dim", "n_layer", "n_head", "num_classes", "vocab_size", "block_size", "multiple_of")
TINY_GPT_BACKBONE = {k: v for k, v in TINY_GPT.items() if k in _BACKBONE}


# ----------------------------------------------------------------------------------------------------------
# the recipe and the pipeline
# ----------------------------------------------------------------------------------------------------------
def _tiny_job(saved_teacher, out: Path, *extra: str) -> list[str]:
    gpt_dir, vq_dir = saved_teacher
    return [f"output_dir={out}", f"teacher.model={gpt_dir}", f"teacher.tokenizer={vq_dir}", "distill.method=dd2",
            "trajectories.num_samples=64", "trajectories.batch_size=32", "trajectories.shard_size=32",
            "trajectories.store_noise=false", "dd2.gts.max_steps=3", "dd2.gts.batch_size=4", "dd2.gts.draws=2",
            "dd2.gts.head_width=32", "dd2.gts.head_depth=1", "dd2.gts.input_hidden=64", "dd2.gts.save_every=0",
            "dd2.csd.max_iters=2", "dd2.csd.regression_iters=1", "dd2.csd.regression_weight=0.5",
            "dd2.csd.batch_size=4", "dd2.csd.draws=2", "dd2.csd.guidance_steps=1",
            "dd2.csd.save_every=0", "evaluate.num_images=20", "evaluate.batch_size=20", "evaluate.latency_repeats=0",
            "evaluate.skip=[4]", "dd2.euler_steps=2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("dd2_teacher")
    gpt = randomize_(LlamaGen(**{**TINY_GPT, "class_dropout_prob": 0.1}), seed=5).eval()
    vq = randomize_(VQTokenizer(**TINY_VQ), seed=3).eval()
    gpt.save_pretrained(root / "gpt")
    vq.save_pretrained(root / "vq")
    return str(root / "gpt"), str(root / "vq")


def test_dd2_recipe_end_to_end(saved_teacher, tmp_path):
    """``distill.method=dd2``: trajectories → GTS → regression warm start and CSD → pipeline → evaluation table with
    the DD2 rows (1-step, two teacher-refined settings, the GTS model); the pipeline round trip; a second run with
    other DD2 settings is refused naming the differences; packaging the DD2 generator as a DD student is refused."""
    from distilled_decoding import DistilledDecodingPipeline
    from distilled_decoding.recipe import load_recipe_config, run
    from distilled_decoding.training_state import TrainingStateError

    out = tmp_path / "job"
    summary = run(load_recipe_config(None, _tiny_job(saved_teacher, out)))
    rows = summary["evaluation"]["rows"]
    assert {"DD2 1-step", "DD2 refined (12-16)", "DD2 refined (8-16)", "GTS model (2-step Euler)"} <= set(rows)
    assert rows["DD2 1-step"]["steps"] == 1 and rows["DD2 refined (12-16)"]["steps"] == 5
    assert "DD 2-step" not in rows and (out / "student" / "gts" / "final" / "config.json").is_file()
    pipe = DistilledDecodingPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.student) is DD2Generator and pipe.info["method"] == "dd2"
    noise = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0))
    images, tokens = pipe.generate(noise, torch.tensor([1, 2, 3]), steps=1, return_tokens=True)
    assert images.shape[0] == 3 and torch.equal(tokens, pipe.student.sample(noise, torch.tensor([1, 2, 3]))[1])
    with pytest.raises(ValueError, match="steps=2: this student supports 1 step"):
        pipe.generate(noise, torch.tensor([1, 2, 3]), steps=2)
    with pytest.raises(TrainingStateError, match="csd.lr_generator"):
        run(load_recipe_config(None, _tiny_job(saved_teacher, out, "dd2.csd.lr_generator=0.001")))
    with pytest.raises(ValueError, match="holds a 'DD2Generator', not the DDStudent"):
        run(load_recipe_config(None, _tiny_job(saved_teacher, out, "distill.method=dd1", "stages=[save]")))


def test_dd2_method_names_are_checked(saved_teacher, tmp_path):
    from distilled_decoding.recipe import load_recipe_config, run

    with pytest.raises(ConfigError, match=r"distill.method='dd3': expected one of \['dd1', 'dd2'\]"):
        load_recipe_config(None, _tiny_job(saved_teacher, tmp_path / "a", "distill.method=dd3"))
    with pytest.raises(ConfigError, match="dd2.init='none'"):
        load_recipe_config(None, _tiny_job(saved_teacher, tmp_path / "a", "dd2.init=none"))
    with pytest.raises(ConfigError, match=r"distill.method='dd2': teacher kind 'par': Distilled Decoding 2 is "
                       r"implemented for 'llamagen', 'var' teachers only"):  # fmt: skip
        run(load_recipe_config(None, ["teacher.kind=par", "distill.method=dd2", f"output_dir={tmp_path / 'p'}",
                                      "stages=[save]"]))  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_dd2_configs_load():
    """The shipped DD2 configs parse and carry DD2's published LlamaGen-L settings (Tab. 10/11)."""
    from distilled_decoding.recipe import load_recipe_config

    digits = load_recipe_config(ROOT / "recipes" / "configs" / "digits_dd2.yaml", ["output_dir=/x"])
    main = load_recipe_config(ROOT / "recipes" / "configs" / "digits_llamagen.yaml", ["output_dir=/x"])
    assert digits.distill.method == "dd2" and digits.dd2.init == "gts" and digits.trajectories == main.trajectories
    large = load_recipe_config(ROOT / "recipes" / "configs" / "llamagen_l_dd2.yaml", ["output_dir=/x"])
    csd, gts = large.dd2.csd, large.dd2.gts
    assert (csd.lr_generator, csd.lr_guidance, csd.lr_start, csd.warmup_guidance_steps) == (1e-4, 2e-4, 1e-6, 40000)
    assert (csd.batch_size, csd.guidance_steps, csd.max_iters, csd.ema_max, csd.generator_t) == (
        1024,
        5,
        12000,
        0.9999,
        1.0,
    )
    assert (gts.lr, gts.batch_size, gts.max_steps, gts.betas) == (1e-4, 512, 100000, (0.9, 0.95))
    assert (large.trajectories.cfg_scale, large.trajectories.top_k) == (2.0, 8000)
