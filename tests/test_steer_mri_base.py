"""The steering claim on mri-base, as docs/steer.md ("Measured on mri-base") states and measures it.

A concept feature picked from an atlas of the shipped L3 SAE, steered over 64 neutral prompts (the issue asks
for at least 50) at the strength calibrated for it, carries its concept at least 10 times as often as the
unsteered model, at no more than twice the perplexity: 13.0x at 1.61x (the docs also give the 100-prompt
figure, 11.0x at 1.55x). The strength is the documented calibrated one, not recalibrated here: calibrating
takes most of the time. Slow: about 20 s on two shared CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mri

DICT = Path(mri.__file__).parent / "zoo" / "dictionaries" / "mri-base" / "sae" / "L3"
FEATURE = 1504
"""The first of the atlas's candidates (`mri steer concept --atlas ... --search 8`) to meet the target."""
STRENGTH = 21.853966
"""The strength `concept_demo` calibrated for it (16 differently seeded samples), as documented."""
CONCEPT = [" können", " sind", " werden", " wur", " soll", " haben", " wird", " wurde", " hat"]
"""The concept words docs/steer.md lists: the whole words the atlas shows the feature promoting."""
N_PROMPTS, MAX_NEW_TOKENS = 64, 64


@pytest.mark.slow
def test_a_concept_feature_from_the_atlas_is_carried_ten_times_as_often_at_under_twice_the_perplexity(
    tmp_path,
):
    from mri.atlas.build import build_atlas
    from mri.data.corpus import sample_corpus
    from mri.dictionaries import load
    from mri.steer import concept_demo, neutral_prompts
    from mri.steer.concept_demo import atlas_concept_words, concept_candidates

    model = mri.load("mri-base")
    sae = load(DICT)
    # the promoted tokens an atlas lists do not depend on how many tokens it streamed; a small atlas keeps
    # this test short (the docs build one of 131,072 tokens to browse)
    atlas = build_atlas(model, sae, sample_corpus(), tmp_path / "atlas", tokens=4096, progress=False)
    words = atlas_concept_words(model, sae, atlas, FEATURE)
    assert [model.tokenizer.decode([t]) for t in words] == CONCEPT
    candidates = concept_candidates(model, sae, 8, atlas=atlas)
    assert FEATURE in [c["feature"] for c in candidates]
    result = concept_demo(
        model,
        sae,
        FEATURE,
        neutral_prompts(N_PROMPTS),
        strength=STRENGTH,
        atlas=atlas,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=0,
    )
    assert result["concept_tokens"] == CONCEPT and result["n_prompts"] == N_PROMPTS
    assert result["rate_ratio"] >= 10, result
    assert result["perplexity_ratio"] <= 2, result
    assert result["passed"]
