"""Cross-lingual features: aligned passages are checked, the misaligned control is a real control, and on
mri-base a trained dictionary has more features shared across languages on aligned passages than on
misaligned ones."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import mri_base_site_acts
from test_atlas_build import planted  # noqa: F401  (planted is a fixture)
from typer.testing import CliRunner

from mri.atlas.commands import atlas_app
from mri.atlas.crosslingual import (
    PassageActs,
    crosslingual_report,
    misaligned,
    write_crosslingual,
)
from mri.data.aligned import (
    AlignmentReport,
    gnome_help_passages,
    load_passages,
    read_passages,
    sample_passages,
    sample_path,
)
from mri.dictionaries import DictConfig, TrainConfig, Trainer, build, save
from mri.errors import MriError

PAGE = """<page xmlns="http://projectmallard.org/1.0/" id="{id}">
  <info><desc>{desc}</desc><credit><name>Someone</name></credit></info>
  <title>{title}</title>
  <p>{p1} <link xref="other-page"/></p>
  <section><title>{title}</title><list><item><p>{p2}</p></item></list></section>
</page>"""
EN = dict(title="Clearing a paper jam", desc="How", p1="Printers feed 2 sheets of paper and get jammed.",
          p2="Open one of the printer panels to find the jam inside and pull it out.")  # fmt: skip
DE = dict(title="Einen Papierstau beheben", desc="Wie", p1="Drucker ziehen 2 Blätter ein und verklemmen.",
          p2="Öffnen Sie eine Abdeckung des Druckers und ziehen Sie das Papier heraus.")  # fmt: skip
FR = dict(title="Résoudre un bourrage", desc="Comment", p1="Les imprimantes tirent 2 feuilles et se bloquent.",
          p2="Ouvrez un des panneaux de l’imprimante pour trouver le papier et retirez-le.")  # fmt: skip


def write_help(root, pages: dict[str, dict[str, dict]]) -> None:
    """pages: language folder -> page name -> fields of PAGE."""
    for lang, by_name in pages.items():
        folder = root / lang / "gnome-help"
        folder.mkdir(parents=True)
        for name, fields in by_name.items():
            (folder / f"{name}.page").write_text(PAGE.format(id=name, **fields), encoding="utf-8")


def test_translated_pages_align_paragraph_by_paragraph(tmp_path):
    es_wrong_number = {**FR, "p1": "Las impresoras toman 3 hojas y se atascan."}
    write_help(tmp_path, {"C": {"jam": EN}, "de": {"jam": DE}, "fr": {"jam": FR}, "es": {"jam": es_wrong_number},
                          "it": {"jam": EN}})  # fmt: skip
    report = AlignmentReport()
    got = list(gnome_help_passages(["en", "de", "fr", "es", "it", "ru"], root=tmp_path, report=report))
    assert [p.id for p in got] == ["gnome-help/jam#1", "gnome-help/jam#3"]  # titles (#0, #2) are short
    assert got[0].texts == {"en": EN["p1"], "de": DE["p1"], "fr": FR["p1"]}  # the empty link adds nothing
    assert got[1].texts["es"] == FR["p2"]  # es's second paragraph passes the checks, its first does not
    assert report.skipped["numbers differ"] == 1 and report.skipped["untranslated"] == 2  # it is English
    assert report.missing == ["gnome-help/ru"] and report.passages == 2


def test_a_page_whose_structure_differs_is_skipped_and_nothing_installed_is_reported(tmp_path):
    write_help(tmp_path, {"C": {"jam": EN}, "de": {"jam": DE}, "fr": {"jam": FR}})
    de = tmp_path / "de" / "gnome-help" / "jam.page"
    de.write_text(de.read_text().replace("<list><item><p>", "<p>").replace("</p></item></list>", "</p>"))
    report = AlignmentReport()
    got = list(gnome_help_passages(["en", "de", "fr"], root=tmp_path, report=report))
    assert report.skipped["structure differs"] == 1 and all("de" not in p.texts for p in got)
    empty = AlignmentReport()
    assert list(gnome_help_passages(root=tmp_path / "nothing", report=empty)) == []
    assert "gnome-user-docs" in empty.missing[0]


def test_the_shipped_sample_is_aligned_and_has_provenance():
    passages = sample_passages()
    assert len(passages) >= 24
    head = json.loads(sample_path().read_text(encoding="utf-8").splitlines()[0])["provenance"]
    assert "gnome-user-docs" in head["source"] and head["licence"]
    for p in passages:
        assert set(p.texts) == {"en", "de", "fr", "es", "it", "ru"}
        numbers = {lang: sorted(re.findall(r"\d+", t)) for lang, t in p.texts.items()}
        assert all(n == numbers["en"] for n in numbers.values()), p.id
        en = len(p.texts["en"].encode())
        assert all(0.4 <= len(t.encode()) / en <= 2.5 for t in p.texts.values()), p.id
        assert len(set(p.texts.values())) == 6  # every language translated
    assert len({p.texts["en"] for p in passages}) == len(passages)


def test_load_passages_keeps_the_languages_asked_and_reads_files(tmp_path):
    got, info = load_passages("sample", ["en", "de", "ru"], min_languages=3, limit=5)
    assert len(got) == 5 and all(set(p.texts) == {"en", "de", "ru"} for p in got)
    assert info["available"] == len(sample_passages()) and "gnome-user-docs" in info["provenance"]["source"]
    with pytest.raises(MriError, match="no passages"):
        load_passages("sample", ["en", "xx"], min_languages=3)
    with pytest.raises(MriError, match="not found"):
        load_passages(tmp_path / "none.jsonl")
    assert read_passages(sample_path())[0] == sample_passages()[0]


def _acts_of_index(n: int, m: int, lengths: list[float]) -> PassageActs:
    """Feature 0's maximum on passage i is i + 1 in every language: the control shows where texts came from."""
    maxima = torch.arange(1, n + 1, dtype=torch.float)[:, None, None].expand(n, m, 1).clone()
    return PassageActs([f"l{j}" for j in range(m)], torch.ones(n, m, dtype=torch.bool), maxima,
                       torch.zeros(n, m, 1, dtype=torch.long))  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_control_pairs_texts_of_different_passages_of_similar_length(seed):
    n, m = 40, 5
    lengths = torch.tensor([float(50 + 7 * (i % 13)) for i in range(n)])
    ctrl = misaligned(_acts_of_index(n, m, lengths.tolist()), seed, lengths)
    origin = ctrl.maxima[:, :, 0].long() - 1  # (passages, languages): the passage each text came from
    assert sorted(origin[:, 0].tolist()) == list(range(n))
    for j in range(m):
        assert sorted(origin[:, j].tolist()) == list(range(n))  # every text used exactly once
    for i in range(n):
        assert len(set(origin[i].tolist())) == m  # no two texts of one passage together
    spread = lengths[origin].max(1).values / lengths[origin].min(1).values
    assert (spread <= 1.5).sum() >= n - (m - 1)  # matched, but for the m - 1 that wrap around the order
    with pytest.raises(MriError, match="more passages"):
        misaligned(_acts_of_index(3, 4, [1, 2, 3]), seed)


def test_a_token_detector_is_cross_lingual_only_where_the_passage_is_aligned(planted):  # noqa: F811
    """ " word" (planted feature 0) in all four languages of passage 0 only: one aligned hit, none in any
    control, since a control passage never holds two texts of one passage."""
    model, sae, _, _ = planted
    fill = ["five dozen jugs", "the lazy dog", "pack my box", "a quick fox", "in the beginning"]
    passages = [{lang: f"{fill[i % 5]} {lang} {i}" for lang in ("en", "de", "fr", "es")} for i in range(12)]
    passages[0] = {"en": "the word", "de": "das word", "fr": "le word", "es": "la word"}
    report = crosslingual_report(model, sae, passages, min_languages=3, max_common=0.5, controls=4)
    assert report["aligned"] == {"hits": 2, "hits_shared_token": 2, "hits_different_tokens": 0, "features": 2}
    assert report["control"]["mean"]["hits"] == 0 and report["ratio"] is None
    assert {e["feature"] for e in report["top_features"]} == {0, 3}  # twins
    ex = report["examples"][0]
    assert ex["passage"] == "0" and ex["peak_tokens"] == {lang: " word" for lang in ("de", "en", "es", "fr")}
    assert ex["texts"]["de"]["tokens"][-1] == " word" and ex["texts"]["de"]["acts"][-1] > 0
    assert max(ex["texts"]["de"]["acts"][:-1]) == 0


def _mri_base_sae(folder, tokens: int = 49152, ctx: int = 128):
    """A TopK SAE (1024 latents, k 16) on mri-base's L2.resid_post, trained on the shipped corpus sample."""
    model, site, acts = mri_base_site_acts("L2.resid_post", tokens, ctx)
    cfg = DictConfig(kind="sae", arch="topk", d_in=256, n_latents=1024, k=16, sites_in=[site], sites_out=[site],
                     model_fingerprint=model.fingerprint())  # fmt: skip
    passes, batch = 6, 1024
    gen = torch.Generator().manual_seed(0)

    def batches():
        for _ in range(passes):
            order = torch.randperm(len(acts), generator=gen)
            for i in range(0, len(order) - batch + 1, batch):
                yield {site: acts[order[i : i + batch]]}

    trainer = Trainer([build(cfg)], TrainConfig(tokens=passes * (len(acts) // batch) * batch, batch_size=batch,
                                                lr=2e-3))  # fmt: skip
    trainer.fit(batches(), progress=False)
    return model, save(trainer.finished()[0], folder)


@pytest.mark.slow
def test_mri_base_shares_more_features_across_aligned_languages_than_misaligned(tmp_path):
    model, folder = _mri_base_sae(tmp_path / "dicts" / "blocks.2.hook_resid_post")
    result = CliRunner().invoke(
        atlas_app,
        ["crosslingual", "--model", "mri-base", "--dict", str(tmp_path / "dicts"), "--site", "L2.resid_post",
         "--passages", "sample", "--out", str(tmp_path / "xl")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "xl" / "crosslingual.json").read_text())
    a, c = report["aligned"], report["control"]
    assert (
        a["hits"] > c["mean"]["hits"] + 3 * max(c["std"]["hits"], 1.0)
        and a["features"] > c["mean"]["features"]
    )
    for row in report["by_max_common"]:
        if row["max_common"] in (
            0.2,
            0.1,
        ):  # well above chance: 3 standard deviations of the control, and 1.2x
            assert row["aligned"] > row["control"] + 3 * max(row["control_std"], 1.0), row
            assert row["aligned"] > 1.2 * row["control"], row
    assert report["passages"] == len(sample_passages()) and report["languages"]["ru"] == report["passages"]
    html = (tmp_path / "xl" / "crosslingual.html").read_text()
    assert "misaligned control" in html and html.count("class='ex'") >= 3 * len(report["examples"])
    again = write_crosslingual(model, folder, tmp_path / "xl2", passages="sample", controls=5)
    assert again["aligned"] == a and again["control"]["runs"] == c["runs"]  # deterministic


def test_the_cli_explains_what_is_wrong(tmp_path):
    runner = CliRunner()
    result = runner.invoke(atlas_app, ["crosslingual", "--model", "mri-base", "--dict", str(tmp_path),
                                       "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code != 0 and "--site" in str(result.exception)
