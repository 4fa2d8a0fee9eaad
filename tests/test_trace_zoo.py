"""Tracing on the shipped mri-base with its shipped transcoders: they load by name and fit it, induction heads
are found, and the two-hop ground-truth report runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import mri
from mri.dictionaries import load
from mri.errors import MriError
from mri.trace import ReplacementModel, attribute, head_scores, load_transcoders
from mri.trace.commands import trace_app
from mri.trace.ground_truth import two_hop_report, zoo_world
from mri.zoo.dictionaries import available, resolve, set_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    return mri.load("mri-base")


@pytest.fixture(scope="module")
def rm(base):
    return ReplacementModel(base, load_transcoders(resolve("mri-base", "transcoders"), base.n_layers))


def test_shipped_transcoders_resolve_by_name_and_fit_the_model(base):
    assert "transcoders" in available()["mri-base"]
    folders = resolve("mri-base", "transcoders")
    assert [f.name for f in folders] == [f"L{i}" for i in range(base.n_layers)]
    manifest = set_manifest("mri-base")
    assert manifest["model_fingerprint"] == base.fingerprint()
    size = sum(p.stat().st_size for f in folders for p in f.iterdir())
    assert size < 6 * 2**20
    for i, folder in enumerate(folders):
        coder = load(folder)
        assert coder.cfg.sites_in == [f"blocks.{i}.hook_mlp_in"]
        assert coder.W_enc.dtype == torch.float32  # fp16 on disk, fp32 once loaded
        m = manifest["layers"][f"L{i}"]
        # plausibility, not a tuned figure: the set's held-out FVU is 0.22-0.59 (docs/trace.md)
        assert 0.0 <= m["fvu"] < 0.75 and m["ce_loss_recovered"] > 0.25
        assert 0 < m["l0"] <= coder.cfg.k and 0.0 <= m["dead_fraction"] < 0.5
    with pytest.raises(MriError, match="no transcoders are shipped for 'mri-tiny'"):
        resolve("mri-tiny", "transcoders")


def test_replacement_model_reproduces_mri_base_and_features_explain_most(rm):
    prompt = "The capital of the region that contains"
    snap = rm.prepare(rm.model.to_tokens(prompt)[0])
    with torch.no_grad():
        out = rm.run(snap)
    torch.testing.assert_close(out.logits[0], snap.logits, rtol=0, atol=1e-4)
    # the transcoders, not their error nodes, carry most of each MLP output past the BOS position
    error = snap.errors[:, 1:].pow(2).sum()
    total = (snap.mlp_out[:, 1:] - snap.mlp_out[:, 1:].mean(1, keepdim=True)).pow(2).sum()
    assert float(error / total) < 0.5


def test_induction_heads_are_found_on_mri_base(base):
    scores = head_scores(base, n_tokens=24, batch=4)
    layer, head, score = scores.top("induction", 1)[0]
    uniform = 1 / 37  # mean attention to one key when a query spreads over the ~37 keys it sees on average
    assert score > 0.4 > 10 * uniform
    prev_layer = scores.top("previous_token", 1)[0][0]
    assert layer > prev_layer  # an induction head reads what an earlier previous-token head wrote
    assert scores.duplicate_token[layer, head] < score


def test_two_hop_report_on_mri_base(base, rm):
    report = two_hop_report(base, rm, limit=24, max_feature_nodes=500)
    assert len(report.cases) == 24
    correct = report.correct
    assert 1 <= len(correct) < 24  # the model answers some held-out two-hop questions, not all
    assert 0.0 <= report.share_on_path <= 1.0
    for case in report.cases:
        assert (case.ablation is None) == (not case.on_path)
        assert case.correct or not case.on_path
        assert all(0 <= layer < base.n_layers for layer, _ in case.bridge_features)
    effects = [c.ablation for c in report.cases if c.ablation is not None]
    assert all(-1.0 <= e <= 1.0 and math.isfinite(e) for e in effects)
    data = report.to_json()
    assert data["questions"] == 24 and data["correct"] == len(correct)
    assert json.loads(json.dumps(data)) == data
    assert "answered correctly" in report.summary()


def test_cli_traces_mri_base_with_its_shipped_transcoders(tmp_path):
    runner = CliRunner()
    out = tmp_path / "g.json"
    prompt = "People in Zokrou speak"
    r = runner.invoke(
        trace_app, ["run", "mri-base", "--prompt", prompt, "--out", str(out), "--max-nodes", "50"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["metadata"]["transcoder_list"] == ["L0", "L1", "L2", "L3"]
    r = runner.invoke(
        trace_app, ["run", "mri-base", "--prompt", prompt, "--target", " Zapaiman", "--out", str(out)]
    )
    assert r.exit_code != 0 and "not one" in str(r.exception)
    r = runner.invoke(trace_app, ["run", "mri-tiny", "--prompt", prompt, "--out", str(out)])
    assert r.exit_code != 0 and "none are shipped for 'mri-tiny'" in str(r.exception)
    report = tmp_path / "two_hop.json"
    r = runner.invoke(
        trace_app, ["two-hop", "mri-base", "--limit", "4", "--max-nodes", "100", "--out", str(report)]
    )
    assert r.exit_code == 0, r.output
    assert "answered correctly" in r.output and json.loads(report.read_text())["questions"] == 4


def test_prompt_past_mri_base_context(rm):
    ids = torch.full((1025,), 5)
    ids[0] = rm.model.tokenizer.bos_token_id
    with pytest.raises(MriError, match="1025 tokens, more than mri-base's context of 1024"):
        attribute(ids, rm)


def test_two_hop_controls_on_mri_base(base, rm):
    """The controls ablate other features than the bridge's: as many, at the same layers and positions,
    never a bridge feature; ablating the graph's most influential features moves the answer far more than
    random ones (docs/trace.md: over all 31 graphs, mean |change| 0.35 against 0.02)."""
    world = zoo_world()
    facts = [world["two_hop_eval"][i] for i in (23, 110, 132)]  # answered, bridge features on the path
    report = two_hop_report(base, rm, {"two_hop_eval": facts}, max_feature_nodes=2000, n_controls=4)
    done = [c for c in report.cases if c.ablation is not None]
    assert len(done) >= 2
    for case in done:
        tied = {tuple(f) for f in case.bridge_features}
        assert len(case.control_features) == len(case.control_ablation) == 4
        assert len({tuple(d) for d in case.control_features}) > 1  # the draws differ
        where = sorted(n.split("_")[0::2] for n in case.on_path)  # (layer, pos) of each bridge feature
        for draw in case.control_features:
            assert not set(draw) & set(case.on_path) and len(set(draw)) == len(draw)
            assert not {(int(n.split("_")[0]), int(n.split("_")[1])) for n in draw} & tied
            assert sorted(n.split("_")[0::2] for n in draw) == where
        assert len(case.top_features) == len(case.on_path)
        top, random = abs(case.top_ablation), sum(abs(v) for v in case.control_ablation) / 4
        assert top > random
    effects = report.effects()
    assert effects["control"]["n"] == 4 * len(done) and effects["top_influence"]["beats_control"] == 1.0
    assert effects["top_influence"]["mean_abs"] > 3 * effects["control"]["mean_abs"]
    assert "random, same layers and positions" in report.summary()
    data = report.to_json()
    assert json.loads(json.dumps(data)) == data
