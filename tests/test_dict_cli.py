"""`mri dict train` / `mri dict eval` end to end on a tiny model, and splicing a dictionary into the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT
from typer.testing import CliRunner

import mri
from mri.data.record import record
from mri.dictionaries import DictConfig, build, load, read_manifest
from mri.dictionaries.commands import dict_app, evaluate, train
from mri.dictionaries.metrics import evaluate_on_model
from mri.errors import MriError


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.fixture
def store(tmp_path, tiny_model_dir, corpus):
    model = mri.load(tiny_model_dir("llama"))
    sites = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
    return record(model, corpus, sites, 2048, tmp_path / "store", dtype="fp32", ctx_len=32, progress=False)


@pytest.mark.parametrize("kind", ["sae", "transcoder", "clt"])
def test_splice_with_error_term_gives_exactly_the_model_loss(tiny_model_dir, kind):
    model = mri.load(tiny_model_dir("llama"))
    if kind == "sae":
        sites_in = sites_out = ["blocks.1.hook_resid_post"]
    else:
        n = 1 if kind == "transcoder" else 3
        sites_in = [f"blocks.{i}.hook_mlp_in" for i in range(n)]
        sites_out = [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    cfg = DictConfig(
        kind=kind, arch="topk", d_in=32, n_latents=64, k=8, sites_in=sites_in, sites_out=sites_out
    )
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    metrics, density = evaluate_on_model(build(cfg), model, ids, batch_size=2)
    assert metrics["ce_spliced_with_error"] == metrics["ce_model"]
    assert metrics["kl_with_error"] == 0
    assert metrics["ce_spliced"] != metrics["ce_model"] and metrics["kl"] > 0
    assert density.shape == (len(sites_in), 64)
    assert metrics["tokens"] == 4 * 23


def test_train_from_a_store_then_evaluate_on_the_model(tmp_path, store, tiny_model_dir, corpus):
    out = tmp_path / "dicts"
    train(
        sites=["L1.resid_post", "L1.mlp_in"],
        out=out,
        store=store,
        latents=64,
        k=4,
        tokens=4096,
        batch_size=256,
        progress=False,
        device="cpu",
    )
    assert sorted(p.name for p in out.iterdir()) == ["blocks.1.hook_mlp_in", "blocks.1.hook_resid_post"]
    folder = out / "blocks.1.hook_resid_post"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["training_tokens"] == 4096 and manifest["model_fingerprint"]
    assert load(folder).cfg.sites_in == ["blocks.1.hook_resid_post"]
    evaluate(folder, model=str(tiny_model_dir("llama")), corpus=corpus, tokens=256, ctx=32, device="cpu")
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in (
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "dense_fraction",
        "ce_loss_recovered",
        "kl",
    ):
        assert key in metrics
    assert metrics["l0"] <= 4 and metrics["ce_spliced_with_error"] == metrics["ce_model"]
    assert (folder / "density.png").stat().st_size > 1000
    evaluate(folder, store=store, out=tmp_path / "store-eval", device="cpu")
    assert json.loads((tmp_path / "store-eval" / "metrics.json").read_text())["tokens"] > 0


def test_cli_trains_a_transcoder_streamed_from_the_model(tmp_path, tiny_model_dir, corpus):
    result = CliRunner().invoke(
        dict_app,
        [
            "train",
            "--model",
            str(tiny_model_dir("llama")),
            "--corpus",
            str(corpus),
            "--site",
            "L1.mlp_in",
            "--kind",
            "transcoder",
            "--arch",
            "batchtopk",
            "--latents",
            "64",
            "--k",
            "4",
            "--tokens",
            "1024",
            "--batch-size",
            "128",
            "--ctx",
            "32",
            "--out",
            str(tmp_path / "tc"),
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    tc = load(tmp_path / "tc")
    assert tc.cfg.sites_out == ["blocks.1.hook_mlp_out"] and float(tc.threshold) > 0


def test_bad_inputs_say_what_is_wrong(tmp_path, store, tiny_model_dir, corpus):
    common = {
        "out": tmp_path / "d",
        "latents": 16,
        "k": 2,
        "tokens": 512,
        "batch_size": 128,
        "progress": False,
        "device": "cpu",
    }
    with pytest.raises(MriError, match="unknown architecture"):
        train(sites=["L1.resid_post"], store=store, arch="swish", **common)
    with pytest.raises(MriError, match="no site"):
        train(sites=["L0.resid_post"], store=store, **common)
    with pytest.raises(MriError, match="unknown site"):
        train(sites=["L9.resid_post"], model=str(tiny_model_dir("llama")), corpus=corpus, **common)
    with pytest.raises(MriError, match="either"):
        train(sites=["L1.resid_post"], **common)
    with pytest.raises(MriError, match="k must be between 1 and n_latents"):
        train(sites=["L1.resid_post"], store=store, **{**common, "k": 17})
    with pytest.raises(MriError, match="IN:OUT"):
        train(sites=["L1.resid_post"], store=store, kind="transcoder", **common)
    with pytest.raises(MriError, match="ran out"):
        train(
            sites=["L1.resid_post"],
            model=str(tiny_model_dir("llama")),
            corpus=corpus,
            **{**common, "tokens": 10**7},
        )


def test_resume_picks_up_the_checkpoint(tmp_path, store, monkeypatch):
    import mri.dictionaries.commands as commands

    monkeypatch.setattr(commands, "discard_checkpoint", lambda folder: None)  # keep the final checkpoint
    common = {
        "sites": ["L1.resid_post"],
        "store": store,
        "latents": 32,
        "k": 4,
        "tokens": 2048,
        "batch_size": 256,
        "progress": False,
        "device": "cpu",
        "checkpoint_every": 3,
    }
    train(out=tmp_path / "a", **common)
    assert (tmp_path / "a.ckpt" / "trainer.json").is_file()
    train(out=tmp_path / "a", resume=True, **common)  # nothing left to train: same weights again
    first = load(tmp_path / "a")
    with pytest.raises(MriError, match=r"other settings .*n_latents: 32 -> 64"):
        train(out=tmp_path / "a", resume=True, **{**common, "latents": 64})
    with pytest.raises(MriError, match=r"lr: None -> 0.01"):
        train(out=tmp_path / "a", resume=True, **{**common, "lr": 0.01})
    train(out=tmp_path / "a", resume=True, **{**common, "checkpoint_every": 5})  # harmless to change
    assert first.cfg.n_latents == 32


def test_a_config_that_does_not_fit_is_refused_before_training(tmp_path, store):
    from mri.dictionaries.memory import free_bytes

    latents = free_bytes("cpu") // (4 * 4 * 32) + 1  # weights + gradients + Adam alone exceed the free memory
    result = CliRunner().invoke(
        dict_app,
        ["train", "--store", str(store), "--site", "L1.resid_post", "--latents", str(latents), "--k", "4"]
        + ["--tokens", "512", "--batch-size", "256", "--out", str(tmp_path / "big"), "--device", "cpu"],
    )
    assert isinstance(result.exception, MriError), result.output
    message = str(result.exception)
    assert "free" in message and "smaller --batch-size" in message and "fewer --latents" in message
    assert "memory:" in result.output and not (tmp_path / "big").exists()


def test_evaluating_on_sites_of_another_width_is_refused(tmp_path, store):
    from mri.dictionaries import save

    cfg = DictConfig(
        kind="sae",
        arch="topk",
        d_in=16,
        n_latents=32,
        k=4,
        sites_in=["blocks.1.hook_resid_post"],
        sites_out=["blocks.1.hook_resid_post"],
    )
    save(build(cfg), tmp_path / "narrow")
    with pytest.raises(
        MriError, match="width 32 at blocks.1.hook_resid_post, but the dictionary's d_in is 16"
    ):
        evaluate(tmp_path / "narrow", store=store, device="cpu")


def _torchrun(tmp_path, args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """`torchrun --nproc-per-node 2 mri dict train ARGS --out two --quiet`: two gloo ranks on the CPU, in a
    fresh folder (returned) that holds nothing else."""
    script = tmp_path / "cli.py"
    script.write_text("from mri.dictionaries.commands import dict_app\n\ndict_app()\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, "train", *args, "--out", "two", "--quiet"],
        cwd=runs, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done, runs


def _one_process(tmp_path, args: list[str]):
    """What one process writes for the same ARGS."""
    result = CliRunner().invoke(dict_app, ["train", *args, "--out", str(tmp_path / "one"), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return load(tmp_path / "one")


def test_torchrun_trains_what_one_process_trains(tmp_path, store):
    """`torchrun --nproc-per-node 2 mri dict train` splits each batch over two gloo ranks and writes the
    dictionary one process writes; rank 1 writes nothing."""
    args = ["--store", str(store), "--site", "L1.resid_post", "--latents", "48", "--k", "4"]
    args += ["--tokens", "2048", "--batch-size", "256", "--checkpoint-every", "3", "--device", "cpu"]
    done, runs = _torchrun(tmp_path, args)
    assert done.stdout.count("dictionary written") == 1 and "memory:" in done.stdout
    assert sorted(p.name for p in runs.iterdir()) == ["two"]  # no checkpoint left, nothing from rank 1
    assert read_manifest(runs / "two")["processes"] == 2
    assert read_manifest(runs / "two")["sharding"] == "batch"
    one, two = _one_process(tmp_path, args), load(runs / "two")
    for name, want in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_with_sharded_latents_trains_what_one_process_trains(tmp_path, store):
    """`--shard-latents`: each of two ranks holds half the latents of a BatchTopK SAE and reads every
    batch whole; rank 0 gathers the halves (for the checkpoints too) and writes the one dictionary that one
    process writes, with the same FVU."""
    args = ["--store", str(store), "--site", "L1.resid_post", "--arch", "batchtopk", "--latents", "96"]
    args += [
        "--k",
        "4",
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--checkpoint-every",
        "3",
        "--device",
        "cpu",
    ]
    done, runs = _torchrun(tmp_path, [*args, "--shard-latents"])
    assert done.stdout.count("dictionary written") == 1
    assert sorted(p.name for p in runs.iterdir()) == ["two"]
    manifest = read_manifest(runs / "two")
    assert manifest["processes"] == 2 and manifest["sharding"] == "latents"
    one, two = _one_process(tmp_path, args), load(runs / "two")
    for name, want in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], want, rtol=1e-5, atol=1e-6, msg=name)
    fvu = read_manifest(tmp_path / "one")["final_train_metrics"]["fvu"]
    assert manifest["final_train_metrics"]["fvu"] == pytest.approx(fvu, rel=1e-5)


def test_shard_latents_needs_torchrun_and_latents_that_split(tmp_path, store, monkeypatch):
    common = {"sites": ["L1.resid_post"], "out": tmp_path / "d", "store": store, "k": 2, "tokens": 512}
    common |= {"batch_size": 128, "progress": False, "device": "cpu", "shard_latents": True}
    with pytest.raises(MriError, match="run under torchrun --nproc-per-node N"):
        train(latents=48, **common)
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before joining the process group
    with pytest.raises(MriError, match=r"47 latents do not split evenly over 2 processes.*e\.g\. 48"):
        train(latents=47, **common)
    with pytest.raises(MriError, match="not a jumprelu sae; train it data-parallel"):
        train(latents=48, arch="jumprelu", **common)
    assert not (tmp_path / "d").exists()


def test_cli_recipe_options_reach_the_dictionary_and_its_manifest(tmp_path, store):
    result = CliRunner().invoke(
        dict_app,
        [
            "train", "--store", str(store), "--site", "L1.resid_post", "--arch", "jumprelu", "--latents", "64",
            "--tokens", "1024", "--batch-size", "256", "--init-norm", "0.05", "--threshold-lr-scale", "10",
            "--out", str(tmp_path / "jr"), "--quiet", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert load(tmp_path / "jr").cfg.init_norm == 0.05
    manifest = json.loads((tmp_path / "jr" / "manifest.json").read_text())
    assert manifest["train_config"]["threshold_lr_scale"] == 10


def test_cli_topk_warmup_reaches_the_manifest_and_a_whole_warmup_is_refused(tmp_path, store):
    """BatchTopK's TopK warm-up (`--topk-warmup`): the threshold is tracked only after it, so a warm-up over
    every step would leave the inference threshold unset, and is refused before anything is written."""
    args = [
        "train",
        "--store",
        str(store),
        "--site",
        "L1.resid_post",
        "--arch",
        "batchtopk",
        "--latents",
        "64",
    ]
    args += ["--k", "4", "--tokens", "1024", "--batch-size", "256", "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(dict_app, [*args, "--topk-warmup", "0.5", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["train_config"]["topk_warmup_fraction"] == 0.5
    assert float(load(tmp_path / "b").batch_threshold) > 0  # set by the two batch-wide steps
    result = CliRunner().invoke(dict_app, [*args, "--topk-warmup", "1", "--out", str(tmp_path / "bad")])
    assert isinstance(result.exception, MriError) and "--topk-warmup" in str(result.exception), result.output
    assert not (tmp_path / "bad").exists()


def test_cli_matryoshka_widths_reach_the_config_and_bad_ones_are_refused(tmp_path, store):
    args = ["train", "--store", str(store), "--site", "L1.resid_post", "--latents", "64", "--k", "4"]
    args += ["--tokens", "1024", "--batch-size", "256", "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(dict_app, [*args, "--matryoshka", "8,32", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert load(tmp_path / "m").cfg.matryoshka == [8, 32]
    result = CliRunner().invoke(dict_app, [*args, "--arch", "gated", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    gated = load(tmp_path / "g")
    assert gated.cfg.arch == "gated" and gated.r_mag.abs().sum() > 0  # the magnitude path trained
    for bad, match in (
        ("8,x", "comma-separated latent counts"),
        ("32,8", "strictly increasing"),
        ("64", "below"),
    ):
        result = CliRunner().invoke(dict_app, [*args, "--matryoshka", bad, "--out", str(tmp_path / "bad")])
        assert isinstance(result.exception, MriError) and match in str(result.exception), result.output
        assert not (tmp_path / "bad").exists()
