"""Dictionary files: our format round-trips, SAELens's format round-trips, bad folders are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mri.dictionaries import DictConfig, build, export_saelens, import_saelens, load, read_manifest, save
from mri.errors import MriError


def _trained_like(kind: str, arch: str):
    sites_in = (
        ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"] if kind == "clt" else ["blocks.1.hook_resid_post"]
    )
    sites_out = (
        ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
        if kind == "clt"
        else (["blocks.1.hook_mlp_out"] if kind == "transcoder" else sites_in)
    )
    if kind == "transcoder":
        sites_in = ["blocks.1.hook_mlp_in"]
    cfg = DictConfig(
        kind=kind,
        arch=arch,
        d_in=12,
        n_latents=40,
        k=5,
        sites_in=sites_in,
        sites_out=sites_out,
        skip=kind != "sae",
    )
    d = build(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        if arch == "batchtopk":
            d.batch_threshold.fill_(0.2)
    return d.eval()


@pytest.mark.parametrize("kind", ["sae", "transcoder", "clt"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "gated"])
def test_save_load_round_trip(tmp_path, kind, arch):
    if (kind, arch) == ("clt", "gated"):
        with pytest.raises(MriError, match="not CLTs"):
            _trained_like(kind, arch)
        return
    d = _trained_like(kind, arch)
    save(d, tmp_path / "dict", provenance={"training_tokens": 123, "command": "mri dict train ..."})
    assert sorted(p.name for p in (tmp_path / "dict").iterdir()) == [
        "config.json",
        "dictionary.safetensors",
        "manifest.json",
    ]
    back = load(tmp_path / "dict")
    assert back.cfg == d.cfg
    for name, value in d.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name
    manifest = read_manifest(tmp_path / "dict")
    assert manifest["dictionary_kind"] == kind and manifest["training_tokens"] == 123
    assert manifest["format_version"] == 1 and manifest["sites_in"] == d.cfg.sites_in
    assert not list(tmp_path.glob(".dict*"))  # the temporary folder was renamed into place


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "gated"])
def test_saelens_round_trip(tmp_path, arch):
    sae = _trained_like("sae", arch)
    export_saelens(sae, tmp_path / "sl", model_name="tiny")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (12, 40) and weights["W_dec"].shape == (40, 12)
    assert (
        cfg["d_in"] == 12
        and cfg["d_sae"] == 40
        and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    )
    assert ("threshold" in weights) == (arch in ("jumprelu", "batchtopk"))
    gated = {"b_gate", "r_mag", "b_mag"} <= set(weights)  # SAELens's names; its gated SAE has no b_enc
    assert gated == (arch == "gated") and ("b_enc" in weights) == (arch != "gated")
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    back = load(tmp_path / "sl")  # load() recognises the SAELens layout
    x = torch.randn(30, 12)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_saelens_import_without_b_dec_on_input(tmp_path, arch):
    sae = _trained_like("sae", arch)
    export_saelens(sae, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    back = import_saelens(tmp_path / "sl")
    x = torch.randn(30, 12)
    proj = x @ sae.W_enc.T  # what SAELens computes without subtracting b_dec
    if arch == "relu":
        want = torch.relu(proj + sae.b_enc)
    else:  # its GatedSAE: the gate's sign, the magnitude path's value
        want = (proj + sae.b_enc > 0).float() * torch.relu(proj * sae.r_mag.exp() + sae.b_mag)
    torch.testing.assert_close(back.encode(x), want.detach(), rtol=1e-5, atol=1e-5)


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(MriError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MriError, match="is not a dictionary"):
        load(tmp_path / "empty")
    with pytest.raises(MriError, match="for SAEs"):
        export_saelens(_trained_like("transcoder", "topk"), tmp_path / "x")
    sae = _trained_like("sae", "topk")
    save(sae, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["n_latents"] = 41
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MriError, match="does not match"):
        load(tmp_path / "d")


def test_files_that_are_not_dictionaries_are_refused(tmp_path):
    save(_trained_like("sae", "topk"), tmp_path / "d")
    with pytest.raises(MriError, match="is a file, not a dictionary"):
        load(tmp_path / "d" / "dictionary.safetensors")
    config = tmp_path / "d" / "config.json"
    good = config.read_text()
    for text, match in [
        ("{not json", "is not a dictionary config: it is not JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"kind": "sae", "arch": "topk"}', "not a dictionary config: it has no d_in, n_latents"),
        (good.replace('"d_in": 12', '"d_in": "wide"'), "not a valid dictionary config"),
    ]:
        config.write_text(text)
        with pytest.raises(MriError, match=match):
            load(tmp_path / "d")
    config.write_text(good)
    (tmp_path / "d" / "dictionary.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(MriError, match="is not a safetensors file"):
        load(tmp_path / "d")
    export_saelens(_trained_like("sae", "relu"), tmp_path / "sl")
    (tmp_path / "sl" / "sae_weights.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(3, 4)}, str(tmp_path / "sl" / "sae_weights.safetensors"))
    with pytest.raises(MriError, match="has no b_enc, W_dec, b_dec"):
        load(tmp_path / "sl")
