"""Measuring steering: concept presence and perplexity under the unsteered model, calibration, the CLI."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import mri
from mri.dictionaries import DictConfig, SparseCoder, save
from mri.errors import MriError
from mri.steer import (
    FeatureEdit,
    Steering,
    calibrate,
    concept_demo,
    concept_tokens,
    diff_of_means,
    generate,
    measure,
    save_vector,
)
from mri.steer.calibrate import Calibration, pick, tradeoff_figure
from mri.steer.commands import steer_app
from mri.steer.measure import Measurement

# The planted dictionary is made by hand and records no model fingerprint, which `Steering` warns about
# once per dictionary (tested in test_steer_interventions.py).
pytestmark = pytest.mark.filterwarnings("ignore:this dictionary records no model fingerprint")

SITE = "blocks.2.hook_resid_post"
PROMPTS = [
    f"The {w} was"
    for w in "fox dog box word jugs model add liquor quick lazy brown five pack dozen beginning jumps".split()
]


@pytest.fixture(scope="module")
def planted(tiny_model_dir):
    """A tiny model with a sharper unembedding, an SAE whose feature 3 writes the unembedding direction of
    ' was' at the last block, and that token's id."""
    model = mri.load(tiny_model_dir("llama"))
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(20)
    (token,) = model.tokenizer(" was", add_special_tokens=False)["input_ids"]
    sae = SparseCoder(
        DictConfig(kind="sae", arch="relu", d_in=32, n_latents=8, sites_in=[SITE], sites_out=[SITE])
    )
    with torch.no_grad():
        u = model.hf.lm_head.weight[token] / model.hf.lm_head.weight[token].norm()
        sae.W_dec[3], sae.W_enc[3] = u, u
    return model, sae.eval(), token


def test_perplexity_is_that_of_the_generated_tokens_under_the_unsteered_model(planted):
    model, _, _ = planted
    gens = generate(model, PROMPTS[:2], max_new_tokens=5, seed=1)
    m = measure(model, gens)
    nll = []
    for p, g in zip(gens.prompt_ids, gens.ids, strict=True):
        logits = model.run(torch.tensor([p + g]), stop=False).logits[0].log_softmax(-1)
        nll += [-float(logits[len(p) - 1 + i, t]) for i, t in enumerate(g)]
    assert m.n_tokens == len(nll)
    assert m.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_a_planted_feature_makes_its_concept_ten_times_as_common(planted):
    model, sae, token = planted
    assert concept_tokens(model, sae, 3, k=1) == [token]  # read off the feature's logit effect
    result = concept_demo(model, sae, 3, PROMPTS, max_new_tokens=8, concept=[token])
    cal = result["calibration"]
    assert result["strength"] > 0 and cal["chosen"] == result["strength"]
    (chosen,) = [p for p in cal["points"] if p["strength"] == cal["chosen"]]
    assert chosen["ppl_ratio"] <= 2 and chosen["token_rate"] == max(
        p["token_rate"] for p in cal["points"] if p["ppl_ratio"] <= 2
    )
    assert result["unsteered_rate"] <= 0.1
    assert result["steered_rate"] >= 0.8
    assert result["rate_ratio"] >= 10
    assert result["perplexity_ratio"] <= 2 and result["kl"] > 0  # the floor; measured 1.31


def test_pick_takes_the_most_concept_within_the_perplexity_budget():
    def point(s, rate, ppl):
        return Measurement(strength=s, n_generations=10, n_tokens=100, perplexity=ppl, token_rate=rate)

    base = point(None, 0.0, 10.0)
    cal = Calibration(
        base,
        [point(1, 0.2, 11), point(2, 0.6, 25), point(4, 0.6, 15), point(8, 1.0, 40)],
        "tokens",
        2.0,
        None,
        "",
    )
    assert pick(cal)[0] == 4  # 2 and 8 break the budget (perplexity > 2 x 10)
    cal.points[1].perplexity = 19
    assert pick(cal)[0] == 2  # a tie goes to the smaller strength
    cal.points = [point(1, 0.0, 11), point(8, 1.0, 40)]
    assert pick(cal)[0] is None


def test_calibration_stops_at_a_strength_that_overflows_and_writes_its_files(planted, tmp_path):
    model, sae, token = planted
    steering = Steering(model, [FeatureEdit(sae, 3, "add", 0.0)])
    cal = calibrate(
        model, steering, PROMPTS[:4], strengths=[0.05, 0.1, 1e39], concept=[token], max_new_tokens=4, refine=0
    )
    assert [p.strength for p in cal.points] == [0.05, 0.1]
    assert cal.largest_finite is not None and 0.1 < cal.largest_finite < 1e39
    json_path, png = cal.save(tmp_path / "cal")
    data = json.loads(json_path.read_text())
    assert data["largest_finite"] == cal.largest_finite and len(data["points"]) == 2
    assert png.stat().st_size > 1000
    # the perplexity ratio is on a log axis (the twin y axis of the first panel, the x axis of the second),
    # spanning 1x, the 2x budget and every measured ratio
    fig = tradeoff_figure(cal)
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    twin = by_label["perplexity / unsteered (log scale)"]
    second = next(ax for ax in fig.axes if ax.get_xlabel().startswith("perplexity / unsteered"))
    assert twin.get_yscale() == "log" and second.get_xscale() == "log"
    ratios = [p.perplexity / cal.baseline.perplexity for p in cal.points]
    low, high = twin.get_ylim()
    assert low < min(1.0, *ratios) and high > max(2.0, *ratios)


@pytest.fixture
def saved_sae(tiny_model_dir, tmp_path):
    """CLI arguments naming the tiny model and a saved TopK SAE trained (by fingerprint) on it."""
    folder = tiny_model_dir("llama")
    fingerprint = mri.load(folder).fingerprint()
    cfg = DictConfig(
        kind="sae",
        arch="topk",
        k=4,
        d_in=32,
        n_latents=16,
        sites_in=[SITE],
        sites_out=[SITE],
        model_fingerprint=fingerprint,
    )
    save(SparseCoder(cfg), tmp_path / "sae")
    return [str(folder), "--dict", str(tmp_path / "sae"), "--feature", "3", "--max-new-tokens", "4"]


def test_cli_steers_and_explains_bad_input(saved_sae, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        steer_app, [*saved_sae, "--strength", "2", "-p", "The fox", "--out", str(tmp_path / "g.json")]
    )
    assert r.exit_code == 0, r.output  # `mri steer MODEL ...` runs `generate`
    assert len(json.loads((tmp_path / "g.json").read_text())["generations"]) == 1
    r = runner.invoke(steer_app, [*saved_sae[:3], "--feature", "99", "--strength", "1", "-p", "x"])
    assert isinstance(r.exception, MriError) and "0..15" in str(r.exception)
    r = runner.invoke(steer_app, [*saved_sae, "--strength", "1e39", "-p", "x", "--no-baseline"])
    assert isinstance(r.exception, MriError) and "largest strength" in str(r.exception)


def test_cli_calibrates_and_makes_vectors(saved_sae, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cal"
    args = ["calibrate", *saved_sae, "--strengths", "1,2", "-p", "a", "-p", "b", "--metric", "activation"]
    r = runner.invoke(steer_app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "calibration.json").is_file() and (out / "tradeoff.png").is_file()
    (tmp_path / "pos.txt").write_text("the fox\nthe dog\n")
    (tmp_path / "neg.txt").write_text("def add\nreturn a\n")
    vector = str(tmp_path / "v.safetensors")
    r = runner.invoke(
        steer_app,
        [
            "vector",
            saved_sae[0],
            "--site",
            "L1.resid_post",
            "--positive",
            str(tmp_path / "pos.txt"),
            "--negative",
            str(tmp_path / "neg.txt"),
            "--out",
            vector,
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        steer_app,
        [
            saved_sae[0],
            "--vector",
            vector,
            "--strength",
            "4",
            "-p",
            "The fox",
            "--max-new-tokens",
            "3",
            "--no-baseline",
        ],
    )
    assert r.exit_code == 0, r.output


def test_concept_candidates_single_out_the_feature_that_writes_one_word(planted) -> None:
    """Ranked from the weights alone: the feature whose decoder writes ' was' comes first, and the search
    runs concept_demo on it (with every try reported)."""
    from mri.steer.concept_demo import concept_candidates, concept_search

    model, sae, token = planted
    ranked = concept_candidates(model, sae, n=8, min_letters=3)
    assert ranked and ranked[0]["feature"] == 3 and ranked[0]["word"] == " was"
    assert ranked[0]["top_ids"][0] == token
    found = concept_search(
        model, sae, PROMPTS[:6], n_candidates=1, strength=8.0, max_new_tokens=6, min_letters=3
    )
    assert [r["feature"] for r in found["tried"]] == [3]
    assert found["best"]["feature"] == 3 and found["best"]["steered_rate"] > found["best"]["unsteered_rate"]


def _mri(monkeypatch, capsys, *args: str) -> tuple[int, str, float]:
    """Run the `mri` console script on `args`: (exit code, stderr on one line, seconds)."""
    from mri.cli import app

    monkeypatch.setattr(sys, "argv", ["mri", *args])
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        app()
    return exit_info.value.code, " ".join(capsys.readouterr().err.split()), time.monotonic() - started


def test_cli_refuses_non_finite_strengths_at_once(saved_sae, monkeypatch, capsys):
    """`--strength inf` used to hang (the search for the largest finite strength halved inf forever) and
    `nan` reported a largest finite strength of nan: both are refused before the model is loaded."""
    cases = [
        (["steer", *saved_sae, "--strength", "inf", "-p", "x"], "got inf"),
        (["steer", *saved_sae, "--strength", "nan", "-p", "x"], "got nan"),
        (["steer", "calibrate", *saved_sae, "--strengths", "1,inf", "-p", "x"], "got inf"),
        (["steer", "concept", *saved_sae[:5], "--strength", "nan"], "got nan"),
    ]
    for args, shown in cases:
        code, err, seconds = _mri(monkeypatch, capsys, *args)
        assert code == 2, err
        assert f"strength must be a finite number, {shown}" in err and "Traceback" not in err
        assert seconds < 15
    code, err, _ = _mri(monkeypatch, capsys, "steer", "calibrate", *saved_sae, "--strengths", "1,x")
    assert code == 2 and "'x' is not one" in err


def _probe_file(path, model, *, fingerprint: str | None) -> tuple[str, torch.Tensor]:
    """A probe-direction file as another tool would write it: two 1-d tensors, the direction ('probe', a
    difference of means at SITE) and the probe's bias ('zero', all zeros), the site in its metadata."""
    probe = diff_of_means(model, SITE, ["the fox was", "the dog was"], ["def add(a, b):", "return a + b"])
    meta = {"site": SITE, **({"model_fingerprint": fingerprint} if fingerprint else {})}
    save_file({"probe": probe.contiguous(), "zero": torch.zeros(32)}, str(path), metadata=meta)
    return str(path), probe


def test_cli_calibrate_steers_the_tensor_named_by_vector_key(saved_sae, tmp_path):
    model = mri.load(saved_sae[0])
    path, _ = _probe_file(tmp_path / "probe.safetensors", model, fingerprint=model.fingerprint())
    runner = CliRunner()
    args = ["calibrate", saved_sae[0], "--vector", path, "--strengths", "4,16", "--concept", " was"]
    args += ["-p", "The fox", "-p", "The dog", "--max-new-tokens", "4"]
    r = runner.invoke(steer_app, args)
    assert isinstance(r.exception, MriError) and "--vector-key" in str(r.exception)  # two tensors: which?
    r = runner.invoke(steer_app, [*args, "--vector-key", "bias"])
    assert isinstance(r.exception, MriError) and "['probe', 'zero']" in str(r.exception)
    kl = {}
    for key in ("probe", "zero"):
        out = tmp_path / key
        r = runner.invoke(steer_app, [*args, "--vector-key", key, "--out", str(out)])
        assert r.exit_code == 0, r.output
        data = json.loads((out / "calibration.json").read_text())
        assert [p["strength"] for p in data["points"]][:2] == [4.0, 16.0]
        kl[key] = [p["kl"] for p in data["points"]]
    # the zero tensor changes nothing; the probe direction moves the next-token distribution, more at 16
    assert max(kl["zero"]) < 1e-6
    assert 1e-4 < kl["probe"][0] < kl["probe"][1]


def test_cli_refuses_a_vector_made_on_another_model_and_warns_once_without_a_fingerprint(saved_sae, tmp_path):
    model = mri.load(saved_sae[0])
    runner = CliRunner()
    run = [saved_sae[0], "--vector-key", "probe", "--strength", "2", "-p", "The fox", "--no-baseline"]
    run += ["--max-new-tokens", "3"]
    other, _ = _probe_file(tmp_path / "other.safetensors", model, fingerprint="0" * 32)
    r = runner.invoke(steer_app, [*run, "--vector", other])
    assert isinstance(r.exception, MriError)
    assert f"trained on another model (fingerprint {'0' * 32}, " in str(r.exception)
    assert model.fingerprint() in str(r.exception) and "mri steer vector" in str(r.exception)
    bare, _ = _probe_file(tmp_path / "bare.safetensors", model, fingerprint=None)
    with pytest.warns(UserWarning, match="records no model fingerprint") as caught:
        for _ in range(2):
            r = runner.invoke(steer_app, [*run, "--vector", bare])
            assert r.exit_code == 0, r.output
    assert sum("bare.safetensors" in str(w.message) for w in caught) == 1
    # one saved by `mri steer vector` records the fingerprint, so it is checked and steers silently
    mine = save_vector(
        tmp_path / "mine.safetensors", torch.ones(32), SITE, model_fingerprint=model.fingerprint()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(steer_app, [*run[:1], *run[3:], "--vector", str(mine)])
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if "fingerprint" in str(w.message)]


def test_concept_candidates_come_from_an_atlas_of_the_dictionary(planted, tmp_path) -> None:
    """With an atlas, the candidates are features that fired in it and their concept words are the whole
    words it shows them promoting; a feature the atlas never saw fire is no candidate, and an atlas of
    another dictionary is refused."""
    from mri.atlas.build import build_atlas
    from mri.steer.concept_demo import atlas_concept_words, concept_candidates

    model, sae, token = planted
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{p} here, and it was so."}) for p in PROMPTS * 8))
    atlas = build_atlas(model, sae, corpus, tmp_path / "atlas", tokens=2048, ctx_len=24, progress=False)
    ranked = concept_candidates(model, sae, n=8, min_letters=3, atlas=atlas)
    top = ranked[0]
    assert top["feature"] == 3 and top["word"] == " was" and top["density"] > 0
    assert top["concept"] == atlas_concept_words(model, sae, atlas, 3) and top["concept"][0] == token
    assert top["fires_on"] and all(isinstance(t, str) for t in top["fires_on"])
    silent = SparseCoder(sae.cfg)
    silent.load_state_dict(sae.state_dict())
    with torch.no_grad():
        silent.b_enc[3] = -1e6  # feature 3 never fires: the atlas shows it dead
    dead = build_atlas(
        model, silent.eval(), corpus, tmp_path / "dead", tokens=2048, ctx_len=24, progress=False
    )
    assert 3 not in [r["feature"] for r in concept_candidates(model, silent, n=8, min_letters=3, atlas=dead)]
    assert 3 in [r["feature"] for r in concept_candidates(model, silent, n=8, min_letters=3)]  # weights alone
    with pytest.raises(MriError, match="another dictionary"):
        concept_candidates(model, sae, n=8, min_letters=3, atlas=dead)
