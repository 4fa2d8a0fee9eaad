"""An atlas is read only against the dictionary it was built from, and is built only from a dictionary of
the model it runs: `Atlas.check_dictionary`, its callers (steering's concept tokens, tracing's atlas
labels) and `allow_other_model`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from test_atlas_build import CTX, planted, planted_ids, write_corpus  # noqa: F401  (planted is a fixture)
from typer.testing import CliRunner

import mri
from mri.atlas import Atlas, build_atlas
from mri.atlas.commands import atlas_app
from mri.atlas.planted import token_detectors
from mri.atlas.source import dictionary_fingerprint
from mri.data.corpus import sample_corpus
from mri.dictionaries import SparseCoder, save
from mri.errors import MriError
from mri.steer.measure import concept_tokens


def test_the_atlas_accepts_its_own_dictionary_loaded_or_by_folder(planted, tmp_path):  # noqa: F811
    model, sae, _, atlas = planted
    assert atlas.manifest["dictionary_fingerprint"] == dictionary_fingerprint(sae)
    atlas.check_dictionary(sae)
    atlas.check_dictionary(save(sae, tmp_path / "sae"))  # saved and read back: the same fingerprint


def test_another_dictionary_is_refused_with_the_reason_and_the_fix(planted, tmp_path):  # noqa: F811
    model, sae, _, atlas = planted
    ids = planted_ids(model)
    same_shape = token_detectors(model, ids[::-1])  # same config, latents in another order
    with pytest.raises(MriError) as err:
        atlas.check_dictionary(same_shape)
    message = str(err.value)
    assert message.startswith(
        f"atlas {atlas.path} was built from another dictionary (same config, other weights"
    )
    assert message.endswith(f"rebuild it with mri atlas {atlas.manifest['model']} DICT --out {atlas.path}")
    smaller = token_detectors(model, ids[:2])
    with pytest.raises(MriError, match=r"another dictionary \(n_latents 4 in the atlas, 2 given\)"):
        atlas.check_dictionary(smaller)
    # an atlas from before the fingerprint was recorded: the config still catches a different shape
    old = tmp_path / "old-atlas"
    shutil.copytree(atlas.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["dictionary_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    Atlas(old).check_dictionary(same_shape)  # nothing to tell them apart by
    with pytest.raises(MriError, match="n_latents 4 in the atlas, 2 given"):
        Atlas(old).check_dictionary(smaller)


def test_concept_tokens_read_only_the_atlas_of_their_dictionary(planted):  # noqa: F811
    model, sae, _, atlas = planted
    ids = planted_ids(model)
    assert concept_tokens(model, sae, 1, atlas=atlas.path, k=1) == [ids[1]]  # " with", from its top examples
    with pytest.raises(MriError, match="was built from another dictionary"):
        concept_tokens(model, token_detectors(model, ids[::-1]), 1, atlas=atlas.path, k=1)


def test_atlas_labels_check_the_transcoders_they_label(tmp_path):
    from mri.explain import explain_atlas
    from mri.trace import atlas_labels, load_transcoders
    from mri.trace.toy import random_transcoders

    model = mri.load("mri-tiny")
    mine = random_transcoders(model, n_latents=24, active=6, seed=0)
    other = random_transcoders(model, n_latents=24, active=6, seed=1)
    folder = save(mine.coders[0], tmp_path / "tc0")
    atlas = build_atlas(
        model, folder, sample_corpus(), tmp_path / "L0", tokens=512, ctx_len=64, progress=False
    )
    explain_atlas(atlas, limit=6, progress=False)
    loaded = load_transcoders([folder], model.n_layers)
    labels = atlas_labels([atlas], transcoders=loaded)
    assert len(labels) == 6 and all(layer == 0 and text for (layer, _), text in labels.items())
    assert atlas_labels([atlas]) == labels  # without transcoders, unchecked (as before)
    with pytest.raises(MriError, match=r"atlas .*L0 was built from another dictionary \(same config"):
        atlas_labels([atlas], transcoders=other)


def test_a_dictionary_of_another_model_is_refused_unless_allowed(planted, tmp_path):  # noqa: F811
    model, sae, corpus, _ = planted
    stranger = SparseCoder(dataclasses.replace(sae.cfg, model_fingerprint="0123456789abcdef"))
    stranger.load_state_dict(sae.state_dict())
    with pytest.raises(MriError, match=r"fingerprint 0123456789abcdef, not .*--allow-other-model"):
        build_atlas(model, stranger, corpus, tmp_path / "a", tokens=200, ctx_len=CTX, progress=False)
    assert not (tmp_path / "a").exists()
    path = build_atlas(model, stranger, corpus, tmp_path / "a", tokens=200, ctx_len=CTX, progress=False,
                       allow_other_model=True)  # fmt: skip
    assert Atlas(path).manifest["dictionary_model_fingerprint"] == "0123456789abcdef"

    folder = save(stranger, tmp_path / "stranger")
    args = [str(model.path), str(folder), "--out", str(tmp_path / "cli"), "--corpus", str(corpus),
            "--tokens", "200", "--ctx", str(CTX)]  # fmt: skip
    refused = CliRunner().invoke(atlas_app, args)
    assert isinstance(refused.exception, MriError) and "--allow-other-model" in str(refused.exception)
    allowed = CliRunner().invoke(atlas_app, [*args, "--allow-other-model"])
    assert allowed.exit_code == 0, allowed.output
    assert Atlas(tmp_path / "cli").manifest["tokens"] > 0
