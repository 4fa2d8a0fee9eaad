"""Steering interventions: what each mode writes, at which positions, during cached generation, in batches."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

import mri
from mri.dictionaries import DictConfig, SparseCoder
from mri.errors import MriError
from mri.steer import (
    FeatureEdit,
    NonFiniteSteering,
    Steering,
    VectorEdit,
    diff_of_means,
    generate,
    largest_finite_strength,
    load_vector,
    save_vector,
)
from mri.steer.generate import FLOAT32_MAX, as_batch, forward_logits

# The dictionaries here are made by hand and record no model fingerprint, which `Steering` warns about
# (once per dictionary); the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:this dictionary records no model fingerprint")

SITE = "blocks.1.hook_resid_post"
PROMPTS = ["The quick brown fox", "def add(a, b):", "In the beginning"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return mri.load(tiny_model_dir("llama"))


def orthonormal_sae(d: int = 32, n: int = 8, site: str = SITE) -> SparseCoder:
    """ReLU SAE with orthonormal rows, W_enc = W_dec and every latent on (b_enc = 10): encoding
    x + c W_dec[f] moves feature f by exactly c."""
    sae = SparseCoder(
        DictConfig(kind="sae", arch="relu", d_in=d, n_latents=n, sites_in=[site], sites_out=[site])
    )
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q.T)
        sae.b_enc.fill_(10.0)
    return sae.eval()


def topk_sae(d: int = 32, n: int = 64, site: str = SITE) -> SparseCoder:
    sae = SparseCoder(
        DictConfig(kind="sae", arch="topk", k=4, d_in=d, n_latents=n, sites_in=[site], sites_out=[site]),
        seed=3,
    )
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def recording(steering: Steering, log: list[torch.Tensor]) -> dict:
    """steering.replace, with each pass's edited value at SITE appended to `log`."""
    fns = steering.replace

    def wrap(value):
        out = fns[SITE](value)
        log.append(out.detach().clone())
        return out

    return {**fns, SITE: wrap}


def test_clamp_holds_the_feature_on_every_generated_token(model):
    sae, f, held = orthonormal_sae(), 2, 3.0
    steering = Steering(model, [FeatureEdit(sae, f, "clamp", held)], positions="generated")
    ids = model.to_tokens(["The quick brown fox"])
    steering.begin(ids.shape[1])
    log: list[torch.Tensor] = []
    with model.hooks(replace=recording(steering, log)):
        out = model.hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2, use_cache=True)
    assert out.shape[1] == ids.shape[1] + 6
    prompt_pass, *token_passes = log
    plain = model.run(ids, read=[SITE]).cache[SITE]
    torch.testing.assert_close(prompt_pass, plain)  # prompt positions untouched
    assert (sae.encode(plain)[..., f] - held).abs().min() > 0.1
    assert len(token_passes) == 5 and all(p.shape[1] == 1 for p in token_passes)  # the KV cache is on
    for p in token_passes:
        torch.testing.assert_close(sae.encode(p)[..., f], torch.full((1, 1), held), atol=1e-4, rtol=1e-5)


def test_cached_generation_matches_a_steered_full_forward(model):
    sae = topk_sae()
    steering = Steering(model, [FeatureEdit(sae, 5, "clamp", 4.0)], positions="generated")
    gens = generate(model, PROMPTS, steering, max_new_tokens=6, temperature=0)
    batch = as_batch(model, gens)
    logits = forward_logits(model, batch, steering)
    for row, (p, g) in enumerate(zip(gens.prompt_ids, gens.ids, strict=True)):
        predicted = logits[row, len(p) - 1 : len(p) + len(g) - 1].argmax(-1).tolist()
        assert predicted == g


def test_clamp_keeps_the_error_term_and_ablate_of_a_silent_feature_changes_nothing(model):
    sae = topk_sae()
    ids = model.to_tokens(PROMPTS)
    x = model.run(ids, read=[SITE]).cache[SITE]
    acts = sae.encode(x)
    f = int(acts[0, 1:].sum(0).argmax())
    for mode, held in (("clamp", 2.5), ("ablate", 0.0)):
        s = Steering(model, [FeatureEdit(sae, f, mode, held)])
        new = model.run(ids, read=[SITE], replace=s.replace).cache[SITE]
        expected = x + (held - acts[..., f])[..., None] * sae.W_dec[f].detach()
        torch.testing.assert_close(new, expected, atol=1e-5, rtol=1e-5)
    silent = int((acts > 0).sum((0, 1)).argmin())
    assert (acts[..., silent] == 0).all()
    s = Steering(model, [FeatureEdit(sae, silent, "ablate")])
    torch.testing.assert_close(model.run(ids, read=[SITE], replace=s.replace).cache[SITE], x)


def test_a_transcoder_clamps_its_output_by_the_activation_read_at_its_input(model):
    site_in, site_out = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
    tc = SparseCoder(
        DictConfig(
            kind="transcoder", arch="relu", d_in=32, n_latents=16, sites_in=[site_in], sites_out=[site_out]
        )
    ).eval()
    with torch.no_grad():
        tc.b_enc.fill_(0.05)
    ids = model.to_tokens(PROMPTS)
    plain = model.run(ids, read=[site_in, site_out]).cache
    a = tc.encode(plain[site_in])[..., 4]
    s = Steering(model, [FeatureEdit(tc, 4, "clamp", 1.5)])
    new = model.run(ids, read=[site_in, site_out], replace=s.replace).cache
    torch.testing.assert_close(new[site_in], plain[site_in])
    expected = plain[site_out] + (1.5 - a)[..., None] * tc.W_dec[4].detach()
    torch.testing.assert_close(new[site_out], expected, atol=1e-5, rtol=1e-5)


def test_add_and_vectors_only_at_the_chosen_positions_and_they_sum(model):
    sae = topk_sae()
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    edits = [
        FeatureEdit(sae, 7, "add", 1.5),
        FeatureEdit(sae, 9, "add", -0.5),
        VectorEdit("L1.resid_post", v, 2.0),
    ]
    ids = model.to_tokens(PROMPTS)
    x = model.run(ids, read=[SITE]).cache[SITE]
    ends = torch.tensor([3, 5, 2])
    W = sae.W_dec.detach()
    delta = 1.5 * W[7] - 0.5 * W[9] + 2.0 * v
    for positions in ("prompt", "generated", "all"):
        s = Steering(model, edits, positions)
        s.begin(ends)
        new = model.run(ids, read=[SITE], replace=s.replace).cache[SITE]
        prompt = torch.arange(ids.shape[1])[None, :] < ends[:, None]
        where = {"prompt": prompt, "generated": ~prompt, "all": torch.ones_like(prompt)}[positions]
        torch.testing.assert_close(new, x + where[..., None] * delta, atol=1e-5, rtol=1e-5)


def test_diff_of_means_vector_round_trips_and_steers(model, tmp_path):
    v = diff_of_means(model, "L1.resid_post", ["the fox", "the dog"], ["def add", "return a"])
    assert v.shape == (32,) and v.norm() > 0
    path = save_vector(tmp_path / "v.safetensors", v, SITE)
    loaded, site = load_vector(path)
    assert site == SITE
    torch.testing.assert_close(loaded, v)
    plain = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    steered = generate(
        model, PROMPTS, Steering(model, [VectorEdit(site, loaded, 50.0)]), max_new_tokens=6, temperature=0
    )
    assert steered.ids != plain.ids


def test_same_seed_same_text_and_batches_match_single_prompts(model):
    steering = Steering(model, [FeatureEdit(topk_sae(), 3, "add", 2.0)], positions="generated")
    state = torch.random.get_rng_state()
    a = generate(model, PROMPTS, steering, max_new_tokens=8, seed=7)
    b = generate(model, PROMPTS, steering, max_new_tokens=8, seed=7)
    c = generate(model, PROMPTS, steering, max_new_tokens=8, seed=8)
    assert a.texts == b.texts and a.ids != c.ids
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    batched = generate(model, PROMPTS, steering, max_new_tokens=8, temperature=0)
    for i, p in enumerate(PROMPTS):
        assert generate(model, [p], steering, max_new_tokens=8, temperature=0).ids[0] == batched.ids[i]


def test_bad_features_dictionaries_and_sites_are_mri_errors(model):
    sae = orthonormal_sae()
    with pytest.raises(MriError, match=r"features 0\.\.7"):
        Steering(model, [FeatureEdit(sae, 8, "add", 1.0)])
    other = orthonormal_sae()
    other.cfg.model_fingerprint = "0" * 32
    with pytest.raises(MriError, match="trained on another model"):
        Steering(model, [FeatureEdit(other, 0, "add", 1.0)])
    far = orthonormal_sae(site="blocks.9.hook_resid_post")
    with pytest.raises(MriError, match="not a site"):
        Steering(model, [FeatureEdit(far, 0, "add", 1.0)])
    with pytest.raises(MriError, match="d_model"):
        Steering(model, [FeatureEdit(orthonormal_sae(d=16), 0, "add", 1.0)])
    with pytest.raises(MriError, match="mode"):
        Steering(model, [FeatureEdit(sae, 0, "boost", 1.0)])  # type: ignore[arg-type]


def test_a_strength_that_overflows_is_caught_and_the_largest_safe_one_found(model):
    steering = Steering(model, [FeatureEdit(orthonormal_sae(), 1, "add", 1e39)])
    with pytest.raises(NonFiniteSteering):
        generate(model, PROMPTS, steering, max_new_tokens=4)
    safe = largest_finite_strength(model, steering, PROMPTS, 1e39)
    assert 1e37 < safe < 1e39
    generate(model, PROMPTS, steering.with_strength(safe), max_new_tokens=4)
    with pytest.raises(NonFiniteSteering):
        generate(model, PROMPTS, steering.with_strength(safe * 1.1), max_new_tokens=4)


def test_non_finite_strengths_are_refused_and_the_finite_search_always_ends(model):
    sae = orthonormal_sae()
    for bad, shown in ((math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan")):
        with pytest.raises(MriError, match=f"strength must be a finite number, got {shown}"):
            FeatureEdit(sae, 1, "add", bad)
        with pytest.raises(MriError, match=f"strength must be a finite number, got {shown}"):
            VectorEdit(SITE, torch.ones(32), bad)
    steering = Steering(model, [FeatureEdit(sae, 1, "add", 1.0)])
    with pytest.raises(MriError, match="strength must be a finite number, got inf"):
        steering.with_strength(math.inf)
    # an infinite or NaN upper end used to loop forever (inf / 2 is inf); the search now starts at
    # float32's largest value and ends within its step budget
    started = time.monotonic()
    safe = largest_finite_strength(model, steering, PROMPTS, math.inf)
    assert largest_finite_strength(model, steering, PROMPTS, math.nan) == safe
    assert largest_finite_strength(model, steering, PROMPTS, -math.inf) == -safe
    # this model's RMSNorm maps an overflowing square to a zero scale, so even float32's largest value
    # stays finite: no larger strength can be represented at all
    assert safe == FLOAT32_MAX
    generate(model, PROMPTS, steering.with_strength(safe), max_new_tokens=4)
    with pytest.raises(NonFiniteSteering):
        generate(model, PROMPTS, steering.with_strength(safe * 1.1), max_new_tokens=4)
    # a vector of entries 1e30 overflows float32 past strength 3.4e8; a zero tolerance would never stop
    # the bisection (the midpoint of two neighbouring floats is one of them): it is floored, and the
    # forward passes are capped, so the search ends just below the true limit
    huge = Steering(model, [VectorEdit(SITE, torch.full((32,), 1e30), 1.0)])
    limit = FLOAT32_MAX / 1e30
    found = largest_finite_strength(model, huge, PROMPTS, 1e12, rel_tol=0.0)
    assert 0.999 * limit < found <= limit
    assert time.monotonic() - started < 60
    assert largest_finite_strength(model, steering, PROMPTS, 0.0) == 0.0


def test_a_dictionary_without_a_fingerprint_is_steered_with_one_warning(model):
    sae = orthonormal_sae()
    with pytest.warns(UserWarning, match="records no model fingerprint") as caught:
        Steering(model, [FeatureEdit(sae, 0, "add", 1.0)])
        Steering(model, [FeatureEdit(sae, 1, "clamp", 2.0)], positions="generated")
    assert sum("fingerprint" in str(w.message) for w in caught) == 1
    stamped = orthonormal_sae()
    stamped.cfg.model_fingerprint = model.fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Steering(model, [FeatureEdit(stamped, 0, "add", 1.0)])
