"""Distilled Decoding 2 for VAR teachers: the teacher score through the VAR interface, the VAR AR-diffusion model
(GTS model, guidance network) and one-step generator, their training (GTS, CSD, kill-and-resume, 2 processes), the
recipe (``distill.method: dd2`` with ``teacher.kind: var``), bad input and the released sizes on the meta device.

The tiny VAR of ``tests/conftest.py``: scales (1, 2, 3) → N = 14 tokens, codebook 64 × 8, 10 classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distilled_decoding import VAR, DDVARStudent, DistilledDecodingPipeline
from distilled_decoding.configs import ConfigError
from distilled_decoding.dd2_config import CSDConfig, GTSConfig
from distilled_decoding.dd2_training import train_csd, train_gts
from distilled_decoding.losses import csd_generator_loss, draw_times_and_noise, gts_loss, guidance_loss
from distilled_decoding.sampling import sample_tokens
from distilled_decoding.students.dd2 import ARDiffusion, DD2Generator
from distilled_decoding.students.dd2_var import DD2VARGenerator, VARARDiffusion
from distilled_decoding.students.var import SHARED_FIELDS
from distilled_decoding.teacher_score import TeacherScore, teacher_logits
from distilled_decoding.teachers import get_family
from distilled_decoding.teachers.var_config import VAR_PRESETS

from .conftest import TINY_TEACHERS, TINY_VAE, TINY_VAR, randomize_
from .dd2_parts import (
    SAMPLING,
    TEACHER_SEED,
    assert_killed_run_resumes,
    assert_two_processes_equal_one,
    sampling_loop_and_one_forward,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_VAR_DD2 = ROOT / "recipes" / "configs" / "digits_var_dd2.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher():
    return TINY_TEACHERS["var"](TEACHER_SEED)


def _model(var, cb, head_base: str = "posterior", **kw) -> VARARDiffusion:
    return VARARDiffusion.from_teacher(var, cb, head_base=head_base, head_width=32, head_depth=1, **kw)


def _batch(var, b: int = 4, seed: int = 0, m: int = 3):
    labels = torch.arange(b) % var.num_classes
    tokens = sample_tokens(var, labels, generator=torch.Generator().manual_seed(seed), cfg_scale=1.5)
    t, eps = draw_times_and_noise(torch.Generator().manual_seed(seed), b, var.seq_len, m, var.Cvae)
    return tokens, labels, t, eps


# ----------------------------------------------------------------------------------------------------------
# teacher score and networks
# ----------------------------------------------------------------------------------------------------------
def test_teacher_logits_are_the_var_sampling_loops_logits(teacher):
    """One VAR forward over the finished sequence gives every scale's sampling logits — what the KV-cache loop
    handed its chooser, with VAR's CFG ramp, temperature, top-k and top-p."""
    var, cb = teacher
    _, _, tokens, labels = sampling_loop_and_one_forward(
        var, cb, {"cfg_scale": 1.5, "temperature": 0.9, "top_k": 20, "top_p": 0.9}
    )
    plain = teacher_logits(var, tokens, labels, cfg_scale=0.0)  # unguided (VAR's cfg 1 ramps to guidance 2)
    guided = teacher_logits(var, tokens, labels, cfg_scale=1.5)
    assert torch.equal(guided[:, :1], plain[:, :1]) and not torch.allclose(guided[:, 1:], plain[:, 1:])


def test_var_ar_diffusion_is_the_teacher_with_a_diffusion_head(teacher):
    """Shapes; the copied transformer and posterior head give the teacher's logits bit for bit (GTS loss 0 against
    the unguided teacher, > 0 against the guided one, whose gradient reaches the blocks); the MLP head starts at
    u = 0 and learns."""
    var, cb = teacher
    tokens, labels, t, eps = _batch(var)
    model = _model(var, cb)
    n, c = var.seq_len, var.C
    with torch.no_grad():
        f = model.features(cb[tokens], labels)
        assert f.shape == (4, n, c) and f.dtype == torch.float32
        assert torch.equal(model.output(f), var(tokens, labels))
        assert model(cb[tokens], labels, cb[tokens][:, :, None].expand(-1, -1, 3, -1), t).shape == (4, n, 3, 8)
    assert model.seq_len == n and model.num_steps == 3 and torch.equal(model.codebook, cb)
    unguided = teacher_logits(var, tokens, labels, cfg_scale=0.0)
    assert float(gts_loss(model, tokens, labels, unguided, t, eps)["gts"]) < 1e-8
    loss = gts_loss(model, tokens, labels, teacher_logits(var, tokens, labels, cfg_scale=1.5), t, eps)["total"]
    assert float(loss.detach()) > 1e-6  # CFG is not in the conditional logits: the GTS stage must learn it
    loss.backward()
    assert model.output.weight.grad.abs().max() > 0 and model.blocks[0].attn.mat_qkv.weight.grad.abs().max() > 0
    assert all(not b.requires_grad for b in model.quantize.buffers())  # the VAE's quantizer is not trained
    mlp = _model(var, cb, "none", input_hidden=16)
    with torch.no_grad():  # the residual input MLP starts at zero output: still the teacher's features
        assert torch.equal(mlp.features(cb[tokens], labels), f)
    out = gts_loss(mlp, tokens, labels, teacher_logits(var, tokens, labels, cfg_scale=1.5), t, eps)
    out["total"].backward()
    assert float(out["total"].detach()) > 1e-3 and mlp.head.final.weight.grad.abs().max() > 0


def test_features_are_scale_causal(teacher):
    """Changing the tokens of scale k changes no feature of scales <= k (bit for bit) and changes those of scale
    k + 1; a prefix of whole scales gives the same features as the whole sequence."""
    var, cb = teacher
    model = _model(var, cb).eval()
    starts = model.starts
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, var.seq_len), generator=g)
    labels = torch.tensor([1, 6])
    with torch.no_grad():
        base = model.features(cb[tokens], labels)
        for k in range(model.num_steps):
            other = tokens.clone()
            other[:, starts[k] : starts[k + 1]] = (other[:, starts[k] : starts[k + 1]] + 1 + k) % 64
            f = model.features(cb[other], labels)
            assert torch.equal(f[:, : starts[k + 1]], base[:, : starts[k + 1]]), k
            if k + 1 < model.num_steps:
                assert not torch.allclose(f[:, starts[k + 1] : starts[k + 2]], base[:, starts[k + 1] : starts[k + 2]])
            prefix = model.features(cb[tokens[:, : starts[k + 1]]], labels)
            assert torch.allclose(prefix, base[:, : starts[k + 1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x: 3 positions do not make whole scales; expected one of \[1, 5, 14\]"):
        model.features(cb[tokens[:, :3]], labels)


def test_scale_by_scale_euler_sampler_matches_the_features_of_its_output(teacher):
    var, cb = teacher
    model = _model(var, cb).eval()
    noise = torch.randn(3, var.seq_len, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4, 8])
    vectors, tokens = model.sample(noise, labels, steps=4)
    assert torch.equal(vectors, cb[tokens])
    with torch.no_grad():
        x = model.euler(model.features(cb[tokens], labels), noise, 4)  # all scales at once from the final sequence
    assert torch.equal((x[..., None, :] - cb).square().sum(-1).argmin(-1), tokens)
    with pytest.raises(ValueError, match="steps=0"):
        model.sample(noise, labels, steps=0)


def test_generator_shape_determinism_and_noise_dependency(teacher):
    """All N token vectors from one forward; deterministic; the token of scale s depends on its own noise and on the
    noise of scales < s only (bit for bit); tokens = the nearest codes; t > 0 refused."""
    var, cb = teacher
    gen = DD2VARGenerator.from_ar_diffusion(_model(var, cb), generator_t=0.5).eval()
    noise = torch.randn(3, var.seq_len, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 5, 9])
    with torch.no_grad():
        x = gen(noise, labels)
        assert x.shape == (3, var.seq_len, 8) and x.dtype == torch.float32 and torch.equal(gen(noise, labels), x)
        assert torch.allclose(gen(noise[1:2], labels[1:2]), x[1:2], atol=1e-5, rtol=1e-5)
        starts = gen.starts
        for j in (0, 2, 7):  # a token of scale 0, 1, 2
            s = max(k for k in range(gen.num_steps) if starts[k] <= j)
            moved = noise.clone()
            moved[:, j] += 1.0
            y = gen(moved, labels)
            same = [i for i in range(var.seq_len) if i != j and i < starts[s + 1]]
            assert torch.equal(y[:, same], x[:, same]), j
            assert not torch.allclose(y[:, j], x[:, j])
            if s + 1 < gen.num_steps:
                assert not torch.allclose(y[:, starts[s + 1] :], x[:, starts[s + 1] :])
    vectors, tokens = gen.sample(noise, labels)
    assert torch.equal(tokens, (x[..., None, :] - cb).square().sum(-1).argmin(-1)) and torch.equal(vectors, cb[tokens])
    assert gen.split_position == var.seq_len and gen.num_steps == 3 and gen.method_name == "DD2"
    with pytest.raises(ValueError, match="t: a DD2 generator samples from pure noise only"):
        gen.predict(noise, labels, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 14, 8\)"):
        gen.sample(noise[:, :5], labels)
    # the generator starts from the AR-diffusion model's weights, its level / position rows shifted by one
    model = _model(var, cb)
    sd = DD2VARGenerator.from_ar_diffusion(model).state_dict()
    assert sd["pos_1LC"].shape == (1, 1 + var.seq_len, var.C) and sd["lvl_embed.weight"].shape == (4, var.C)
    assert torch.equal(sd["pos_1LC"][0, 1:], model.pos_1LC[0]) and torch.equal(sd["pos_1LC"][0, 0], model.pos_1LC[0, 0])
    assert torch.equal(sd["blocks.0.attn.mat_qkv.weight"], model.blocks[0].attn.mat_qkv.weight)


def test_csd_losses_on_var(teacher):
    """α = 1 SiD loss with the guidance network equal to the unguided teacher's score: 0; with a guided teacher it is
    not, its gradient reaches the generator and not the guidance network; the guidance loss trains the guidance."""
    var, cb = teacher
    gen = DD2VARGenerator.from_ar_diffusion(_model(var, cb))
    guide = _model(var, cb)
    _, labels, t, eps = _batch(var)
    noise = torch.randn(4, var.seq_len, 8, generator=torch.Generator().manual_seed(3))
    other = csd_generator_loss(gen, guide, TeacherScore(var, cb, cfg_scale=2.0), noise, labels, t, eps)
    other["total"].backward()
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    div = float(other["div"])  # the tiny VAE's codes are small (norm ~0.2): so are the divergences
    assert div > 1e-6 and max(float(g.abs().max()) for g in grads) > 1e-6
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in guide.parameters())
    gen.zero_grad()
    same = csd_generator_loss(gen, guide, TeacherScore(var, cb, cfg_scale=0.0), noise, labels, t, eps)
    assert abs(float(same["total"].detach())) < 1e-6 and float(same["div"]) < 1e-6 * div
    with torch.no_grad():
        x_g = gen(noise, labels)
    dsm = guidance_loss(guide, x_g, labels, t, eps)
    dsm["total"].backward()
    assert guide.head.final.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------
def test_gts_and_csd_run_on_a_var_teacher(teacher, tmp_path):
    """train_gts and train_csd are family-agnostic: the VAR networks come from the registry; two steps each."""
    var, cb = teacher
    labels = torch.arange(8) % 10
    tokens = sample_tokens(var, labels, generator=torch.Generator().manual_seed(1), **SAMPLING)
    small = dict(batch_size=4, draws=2, save_every=0, progress=False, sampling=SAMPLING)
    cfg = GTSConfig(output_dir=str(tmp_path / "gts"), max_steps=2, head_width=32, head_depth=1, input_hidden=0,
                    **small)  # fmt: skip
    assert type(cfg.initial_model(var, cb)) is VARARDiffusion
    gts, summary = train_gts(cfg, var, cb, tokens, labels)
    assert type(gts) is VARARDiffusion and summary["steps"] == 2 and summary["last"]["gts"] >= 0
    gen, guide, summary = train_csd(CSDConfig(output_dir=str(tmp_path / "csd"), max_iters=2, guidance_steps=2,
                                              warmup_guidance_steps=2, **small), var, cb, gts)  # fmt: skip
    assert type(gen) is DD2VARGenerator and type(guide) is VARARDiffusion
    assert summary["steps"] == 2 and summary["guidance_updates"] == 4
    init = DD2VARGenerator.from_ar_diffusion(gts).state_dict()
    assert max(float((v - init[k]).abs().max()) for k, v in gen.state_dict().items()) > 0
    assert torch.isfinite(gen(torch.randn(2, var.seq_len, 8), labels[:2])).all()


@pytest.mark.slow
def test_killed_var_dd2_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL during CSD on the tiny VAR, started again: the weights of an uninterrupted run bit for bit
    (:func:`tests.dd2_parts.assert_killed_run_resumes`)."""
    assert_killed_run_resumes(tmp_path, "var")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_train_the_same_var_dd2_model(tmp_path):
    assert_two_processes_equal_one(tmp_path, "var", 29533)


# ----------------------------------------------------------------------------------------------------------
# saving, loading, bad input
# ----------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(teacher, tmp_path):
    var, cb = teacher
    model = _model(var, cb)
    gen = DD2VARGenerator.from_ar_diffusion(model, generator_t=0.5, noise_scale=0.3).eval()
    model.save_pretrained(tmp_path / "m")
    gen.save_pretrained(tmp_path / "g")
    back_m, back_g = VARARDiffusion.from_pretrained(tmp_path / "m"), DD2VARGenerator.from_pretrained(tmp_path / "g")
    assert type(back_g) is DD2VARGenerator and (back_g.config.generator_t, back_g.config.noise_scale) == (0.5, 0.3)
    for a, b in ((model, back_m), (gen, back_g)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    noise, labels = torch.randn(2, var.seq_len, 8), torch.tensor([2, 3])
    assert torch.equal(back_g.eval().sample(noise, labels)[1], gen.sample(noise, labels)[1])
    with torch.no_grad():
        assert torch.equal(back_m.features(cb[gen.sample(noise, labels)[1]], labels),
                           model.features(cb[gen.sample(noise, labels)[1]], labels))  # fmt: skip
    # a pipeline around it: the VAE as tokenizer, generate, save / load
    pipe = DistilledDecodingPipeline(student=back_g, tokenizer=var.vae)
    images = pipe.generate(noise, labels, steps=1)
    pipe.save_pretrained(tmp_path / "pipe")
    again = DistilledDecodingPipeline.from_pretrained(tmp_path / "pipe")
    assert type(again.student) is DD2VARGenerator and torch.equal(again.generate(noise, labels, steps=1), images)


def test_bad_input_names_the_argument_or_file(teacher, tmp_path):
    var, cb = teacher
    model = _model(var, cb)
    gen = DD2VARGenerator.from_ar_diffusion(model)
    gen.save_pretrained(tmp_path / "var_gen")
    llama, llama_cb = TINY_TEACHERS["llamagen"](TEACHER_SEED)
    llama_model = ARDiffusion.from_teacher(llama, llama_cb, head_width=32, head_depth=1, input_hidden=16)
    DD2Generator.from_ar_diffusion(llama_model).save_pretrained(tmp_path / "llama_gen")
    DDVARStudent.from_teacher(var, cb).save_pretrained(tmp_path / "dd1")
    # a VAR DD2 generator where a LlamaGen one (or a DD1 student) is expected, and the reverse
    with pytest.raises(ValueError, match=r"var_gen/config.json: holds a DD2VARGenerator, not a DD2Generator"):
        DD2Generator.from_pretrained(tmp_path / "var_gen")
    with pytest.raises(ValueError, match=r"llama_gen/config.json: holds a DD2Generator, not a DD2VARGenerator"):
        DD2VARGenerator.from_pretrained(tmp_path / "llama_gen")
    with pytest.raises(ValueError, match=r"var_gen/config.json: holds a DD2VARGenerator, not a DDVARStudent"):
        DDVARStudent.from_pretrained(tmp_path / "var_gen")
    with pytest.raises(ValueError, match=r"dd1/config.json: holds a DDVARStudent, not a DD2VARGenerator"):
        DD2VARGenerator.from_pretrained(tmp_path / "dd1")
    with pytest.raises(TypeError, match="model: expected a VARARDiffusion .*got ARDiffusion"):
        DD2VARGenerator.from_ar_diffusion(llama_model)
    with pytest.raises(TypeError, match="model: expected an ARDiffusion .*got VARARDiffusion"):
        DD2Generator.from_ar_diffusion(model)
    with pytest.raises(TypeError, match="teacher: expected a VAR here .*got LlamaGen"):
        VARARDiffusion.from_teacher(llama, llama_cb)
    with pytest.raises(ValueError, match="codebook: differs from the VAR teacher's VQVAE codebook"):
        VARARDiffusion.from_teacher(var, cb + 1.0)
    with pytest.raises(ValueError, match=r"codebook: expected \(64, 8\)"):
        VARARDiffusion.from_teacher(var, cb[:10])
    # a teacher other than the one the guidance network (the GTS model) was made from
    other, other_cb = TINY_TEACHERS["var"](TEACHER_SEED + 1)
    with pytest.raises(ValueError, match="teacher: its weights .* not those of the teacher the GTS model"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), other, other_cb, model)
    with pytest.raises(ValueError, match="teacher: its weights .* not those of the teacher the GTS model"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), llama, llama_cb, model)
    with pytest.raises(TypeError, match="init: expected an ARDiffusion or VARARDiffusion .*got DD2VARGenerator"):
        train_csd(CSDConfig(output_dir=str(tmp_path / "x"), max_iters=1), var, cb, gen)
    assert not (tmp_path / "x").exists()
    # configs: a VAE config that does not fit the transformer, a family without DD2
    settings = {k: v for k, v in model.config.items() if not k.startswith("_")}
    with pytest.raises(ConfigError, match=r"vocab_size=64: expected the VAE's value 32"):
        VARARDiffusion(**{**settings, "vae_config": {**TINY_VAE, "vocab_size": 32}})
    with pytest.raises(ConfigError, match="timesteps"):
        DD2VARGenerator(**{**settings, "timesteps": (0, 1)})
    par, par_cb = TINY_TEACHERS["par"](0)
    with pytest.raises(ValueError, match="teacher kind 'par': Distilled Decoding 2 is implemented for 'llamagen', "
                                         "'var' teachers only"):  # fmt: skip
        GTSConfig().initial_model(par, par_cb)


# ----------------------------------------------------------------------------------------------------------
# the recipe and the released sizes
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_var(tmp_path_factory):
    """The tiny VAR with scales (1, 2, 4) (21 tokens; 8 px images, the digits metrics' smallest size), saved."""
    root = tmp_path_factory.mktemp("dd2_var_teacher")
    pns = (1, 2, 4)
    var = randomize_(VAR(**{**TINY_VAR, "patch_nums": pns}, vae_config={**TINY_VAE, "v_patch_nums": pns}), seed=5)
    var.eval().save_pretrained(root / "var")
    return str(root / "var")


def _tiny_job(saved_var: str, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", "teacher.kind=var", f"teacher.model={saved_var}", "distill.method=dd2",
            "trajectories.num_samples=32", "trajectories.batch_size=16", "trajectories.shard_size=16",
            "trajectories.store_noise=false", "dd2.gts.max_steps=2", "dd2.gts.batch_size=4", "dd2.gts.draws=2",
            "dd2.gts.head_width=32", "dd2.gts.head_depth=1", "dd2.gts.input_hidden=0", "dd2.gts.save_every=0",
            "dd2.csd.max_iters=2", "dd2.csd.batch_size=4", "dd2.csd.draws=2", "dd2.csd.guidance_steps=1",
            "dd2.csd.save_every=0", "evaluate.num_images=20", "evaluate.batch_size=20", "evaluate.latency_repeats=0",
            "evaluate.skip=[1]", "dd2.euler_steps=2", *extra]  # fmt: skip


def test_var_dd2_recipe_end_to_end(saved_var, tmp_path):
    """``distill.method=dd2`` on a VAR teacher: trajectories → GTS → CSD → pipeline → evaluation table (DD2 1-step,
    two teacher-refined rows in scales, the GTS model's row in scales); packaging the DD2 generator as a DD1 student
    is refused naming the file."""
    from distilled_decoding.recipe import load_recipe_config, run

    out = tmp_path / "job"
    summary = run(load_recipe_config(DIGITS_VAR_DD2, _tiny_job(saved_var, out)))
    rows = summary["evaluation"]["rows"]
    assert {"DD2 1-step", "DD2 refined (2-3)", "GTS model (2-step Euler)"} <= set(rows)  # S = 3: both tails are (2, 3)
    assert rows["DD2 1-step"]["steps"] == 1 and rows["GTS model (2-step Euler)"]["steps"] == 3
    pipe = DistilledDecodingPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.student) is DD2VARGenerator and pipe.info["method"] == "dd2"
    noise = torch.randn(2, 21, 8, generator=torch.Generator().manual_seed(0))
    _, tokens = pipe.generate(noise, torch.tensor([1, 2]), steps=1, return_tokens=True)
    assert torch.equal(tokens, pipe.student.sample(noise, torch.tensor([1, 2]))[1])
    assert type(VARARDiffusion.from_pretrained(out / "student" / "gts" / "final")) is VARARDiffusion
    with pytest.raises(ValueError, match="holds a 'DD2VARGenerator', not the DDVARStudent"):
        run(load_recipe_config(DIGITS_VAR_DD2, _tiny_job(saved_var, out, "distill.method=dd1", "stages=[save]")))


def test_var_dd2_configs_load():
    """The digits VAR DD2 job shares the DD VAR job's trajectories; the d16/d20/d24 configs carry DD2's published
    settings (Tab. 10/11)."""
    from distilled_decoding.recipe import load_recipe_config

    digits = load_recipe_config(DIGITS_VAR_DD2, ["output_dir=/x"])
    main = load_recipe_config(ROOT / "recipes" / "configs" / "digits_var.yaml", ["output_dir=/x"])
    assert digits.distill.method == "dd2" and digits.teacher.kind == "var" and digits.trajectories == main.trajectories
    assert digits.dd2.gts.input_hidden == 0
    published = {  # depth: (GTS steps, CSD iterations, align_at, K, K after, batch, lr generator, lr guidance, warm-up)
        16: (330000, 15500, 8000, 5, 2, 512, 2e-4, 2e-4, 40000),
        20: (330000, 34000, 16000, 5, 2, 512, 2e-4, 2e-4, 40000),
        24: (230000, 15000, None, 2, 2, 1024, 5e-5, 4e-4, 20000),
    }
    for depth, want in published.items():
        cfg = load_recipe_config(ROOT / "recipes" / "configs" / f"var_d{depth}_dd2.yaml", ["output_dir=/x"])
        gts, csd = cfg.dd2.gts, cfg.dd2.csd
        got = (gts.max_steps, csd.max_iters, csd.align_at, csd.guidance_steps, csd.guidance_steps_after_align,
               csd.batch_size, csd.lr_generator, csd.lr_guidance, csd.warmup_guidance_steps)  # fmt: skip
        assert got == want, depth
        assert (gts.lr, gts.batch_size, gts.betas, csd.betas, csd.lr_start, csd.ema_max, csd.generator_t) == (
            2e-4, 512, (0.9, 0.95), (0.9, 0.95), 1e-6, 0.9999, 1.0)  # fmt: skip
        t = cfg.trajectories
        assert (cfg.teacher.kind, cfg.teacher.preset, t.cfg_scale, t.top_k, t.top_p) == ("var", depth, 1.5, 900, 0.95)


def _head_parameters(c: int, d: int, width: int, depth: int, freq: int = 128) -> int:
    """Parameters of a DiffusionHead: time and condition embeddings, input projection, AdaLN residual blocks, final
    AdaLN and output layer."""
    w = width
    blocks = depth * (2 * w + 2 * (w * w + w) + (3 * w * w + 3 * w))
    return (freq * w + w + w * w + w) + (c * w + w) + (d * w + w) + blocks + (2 * w * w + 2 * w) + (w * d + d)


@pytest.mark.parametrize("depth", [16, 20, 24])
def test_released_sizes_construct_on_the_meta_device(depth):
    """VAR-d16/d20/d24 DD2 networks (the configs' head: width 1024, depth 3) on the meta device: the teacher's
    parameters without the null class row, plus the diffusion head (the generator: one more level and position
    row); DD2's reported sizes within 1.5 %."""
    from distilled_decoding.recipe import load_recipe_config

    gts = load_recipe_config(ROOT / "recipes" / "configs" / f"var_d{depth}_dd2.yaml", ["output_dir=/x"]).dd2.gts
    fields = {k: v for k, v in VAR_PRESETS[f"d{depth}"].items() if k in SHARED_FIELDS}
    head = dict(head_width=gts.head_width, head_depth=gts.head_depth, input_hidden=gts.input_hidden)
    with torch.device("meta"):
        teacher = VAR(**VAR_PRESETS[f"d{depth}"])
        model = VARARDiffusion(**fields, vae_config={}, **head)
        gen = DD2VARGenerator(**fields, vae_config={}, **head)
    c = teacher.C
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert n_teacher == {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360}[depth]
    n = sum(p.numel() for p in model.parameters())
    assert n == n_teacher - c + _head_parameters(c, 32, 1024, 3)
    assert sum(p.numel() for p in gen.parameters()) == n + 2 * c
    assert abs(n / {16: 329e6, 20: 619e6, 24: 1.04e9}[depth] - 1) < 0.015
    assert model.pos_1LC.shape == (1, 680, c) and gen.pos_1LC.shape == (1, 681, c)
    assert model.lvl_embed.weight.shape == (10, c) and gen.lvl_embed.weight.shape == (11, c)
    assert model.codebook.shape == (4096, 32) and model.output.weight.shape == (4096, c)
    assert model.attn_bias.shape == (1, 1, 680, 680) and gen.attn_bias.shape == (1, 1, 681, 681)
    assert get_family("var").dd2_generator_class is DD2VARGenerator


def test_tiny_var_config_constants():
    """The tiny VAR these tests use (a guard for the shapes hard-coded above)."""
    assert TINY_VAR["patch_nums"] == (1, 2, 3) and TINY_VAE["z_channels"] == 8 and TINY_VAR["vocab_size"] == 64
