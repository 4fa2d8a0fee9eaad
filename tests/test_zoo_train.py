"""Zoo tokenizer, pre-tokenization and organism training: loading, exact resume, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mri.errors import MriError
from mri.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from mri.zoo.tokens import load_split, pack_tokens, pretokenize
from mri.zoo.train import TrainConfig, source_weights, train
from mri.zoo.world import generate_world, save_world, world_documents

PROSE = (
    "The river ran past the mill and the miller counted his sacks of grain before the winter came. "
    "def area(width, height):\n    return width * height\n"
    "Every evening the lamps were lit along the harbor and the boats came home with their nets. "
)


def make_corpus(folder: Path, n_world_docs: int = 300) -> Path:
    """A small corpus in the zoo's layout: train/val parquet shards, world.json, manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    world = generate_world(0)
    save_world(world, folder / "world.json")
    rng = np.random.default_rng(0)
    prose = [" ".join(PROSE.split(". ")[j % 3] for j in rng.permutation(12)) + "." for _ in range(200)]
    rows = [(t, "prose") for t in prose] + [(t, "world") for t in world_documents(world, n_world_docs, 1)]
    splits = {"train-00000.parquet": [r for i, r in enumerate(rows) if i % 10], "val.parquet": rows[::10]}
    for name, part in splits.items():
        table = {
            "text": [t for t, _ in part],
            "source": [s for _, s in part],
            "doc_id": pa.array(range(len(part)), pa.int64()),
        }
        pq.write_table(pa.table(table), folder / name)
    sources = {
        source: {"documents": sum(s == source for _, s in rows), "tokens": None}
        for source in ("prose", "world")
    }
    manifest = {"kind": "corpus", "test": True, "shards": ["train-00000.parquet"], "sources": sources,
                "totals": {"documents": len(rows), "tokens": None}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def zoo_tokens(tmp_path_factory) -> Path:
    """A tokens folder made from the small corpus with a 512-token vocabulary."""
    root = tmp_path_factory.mktemp("zoo")
    corpus = make_corpus(root / "corpus")
    train_tokenizer(corpus, root / "tok", vocab_size=512)
    return pretokenize(corpus, root / "tok", root / "tokens")


def tiny_config(**overrides) -> TrainConfig:
    base = dict(layers=2, d_model=64, heads=2, ctx=64, batch=8, tokens=8 * 64 * 20, lr=3e-3, warmup=5, val_windows=4,
                log_every=5, eval_every=1000, checkpoint_every=1000, mix={"world": 0.4, "facts": 0.1}, threads=1,
                evaluate=False)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_tokenizer_loads_both_ways_and_roundtrips(zoo_tokens: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = zoo_tokens / "tokenizer"
    auto = AutoTokenizer.from_pretrained(str(folder))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Ünïcode and code:\n\tdef f(x):  return x ** 2  # done\n"
    ids = auto(text).input_ids
    assert ids[0] == BOS_ID and fast(text).input_ids == ids
    assert auto.decode(ids, skip_special_tokens=True) == text
    # deterministic: training again on the same corpus gives the same file
    again = train_tokenizer(zoo_tokens.parent / "corpus", tmp_path / "tok", vocab_size=512)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_pretokenized_docs_are_framed_and_pack_roundtrips(zoo_tokens: Path, tmp_path: Path) -> None:
    train_arrays = load_split(zoo_tokens, "train")
    assert set(train_arrays) == {"prose", "world", "facts"}
    for arr in train_arrays.values():
        assert arr.dtype == np.uint16 and arr[0] == BOS_ID and arr[-1] == EOS_ID
        assert np.count_nonzero(arr == BOS_ID) == np.count_nonzero(arr == EOS_ID)
    packed = pack_tokens(zoo_tokens, tmp_path / "packed")
    assert not list(packed.glob("*/*.npy"))
    for split in ("train", "val"):
        a, b = load_split(zoo_tokens, split), load_split(packed, split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_source_weights_fix_named_shares_and_reject_bad_mixes() -> None:
    w = source_weights({"a": 100, "b": 300, "c": 600}, {"a": 0.5})
    assert w == pytest.approx({"a": 0.5, "b": 0.5 * 300 / 900, "c": 0.5 * 600 / 900})
    with pytest.raises(MriError, match="unknown sources"):
        source_weights({"a": 1}, {"z": 0.1})
    with pytest.raises(MriError, match="sum to"):
        source_weights({"a": 1, "b": 1}, {"a": 0.7, "b": 0.6})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resume_is_exact(zoo_tokens: Path, tmp_path: Path, family: str) -> None:
    straight = train(zoo_tokens, tmp_path / "straight", tiny_config(family=family))
    first = train(zoo_tokens, tmp_path / "resumed", tiny_config(family=family, stop_after=10))
    assert first["steps"] == 10 and not first["finished"]
    resumed = train(zoo_tokens, tmp_path / "resumed", tiny_config(family=family))
    assert resumed["steps"] == straight["steps"] == 20
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["train_loss"] == straight["train_loss"]
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["train"][-1][1] < state["train"][0][1] - 0.5  # it learned, in either family
    config = json.loads((Path(resumed["model"]) / "config.json").read_text())
    assert config["model_type"] == family


def test_resume_allows_run_control_changes(zoo_tokens: Path, tmp_path: Path) -> None:
    """Whether the final model is evaluated, and how many CPU threads run, do not change the weights."""
    from mri.zoo.train import RUN_CONTROL

    assert {"evaluate", "threads"} <= set(RUN_CONTROL)
    first = train(zoo_tokens, tmp_path / "run", tiny_config(stop_after=5, evaluate=True, threads=1))
    assert first["steps"] == 5 and not first["finished"]
    resumed = train(zoo_tokens, tmp_path / "run", tiny_config(evaluate=False, threads=None, log_every=1))
    assert resumed["finished"] and resumed["steps"] == 20
    card = json.loads((Path(resumed["model"]) / "card.json").read_text())
    assert card["metrics"] == {}  # the resumed run's evaluate=False is the one that counts


def test_resume_refuses_a_different_config(zoo_tokens: Path, tmp_path: Path) -> None:
    train(zoo_tokens, tmp_path / "run", tiny_config(stop_after=2))
    with pytest.raises(MriError, match="lr=0.003"):
        train(zoo_tokens, tmp_path / "run", tiny_config(lr=1e-3))


def test_tiny_organism_learns_and_is_a_plain_hf_folder(zoo_tokens: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tokens=8 * 64 * 150, eval_every=150, checkpoint_every=150, evaluate=True)
    summary = train(zoo_tokens, tmp_path / "tiny", cfg)
    state = json.loads((tmp_path / "tiny" / "checkpoint" / "state.json").read_text())
    first_loss, last_loss = state["train"][0][1], state["train"][-1][1]
    assert last_loss < first_loss - 1.0
    folder = Path(summary["model"])
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert model.dtype == torch.float16
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    assert tok.bos_token_id == 0
    card = json.loads((folder / "card.json").read_text())
    metrics = card["metrics"]
    assert set(metrics["val_loss"]) == {"prose", "world"}
    assert (
        metrics["val_loss"]["prose"] < 4.0
    )  # the repetitive prose is learned (uniform would be ln 512 = 6.2)
    assert 0.0 <= metrics["one_hop_accuracy"] <= 1.0 and metrics["n_facts"]["facts"] > 0
    assert (folder / "model_card.md").read_text().startswith("# ")
    assert (tmp_path / "tiny" / "loss.png").stat().st_size > 1000
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "zoo-organism" and len(manifest["weights_sha256"]) == 64


def test_greedy_match_check_agrees_with_generation(zoo_tokens: Path, tmp_path: Path) -> None:
    from mri.zoo.evals import encode, greedy_matches, load_organism

    summary = train(zoo_tokens, tmp_path / "g", tiny_config(tokens=8 * 64 * 40))
    model, tok = load_organism(summary["model"])
    prompts = [encode(tok, p) for p in ("The river ran past the", "def area(width,", "Every evening the")]
    targets = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            for _ in range(4):
                x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], dim=1)
            targets.append(x[0, len(p) :].tolist())
    assert greedy_matches(model, prompts, targets) == [True] * 3
    wrong = [t[:-1] + [(t[-1] + 1) % 512] for t in targets]
    assert greedy_matches(model, prompts, wrong) == [False] * 3


def test_init_from_an_hf_folder_reproduces_its_weights(zoo_tokens: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mri.zoo.train import build_model, load_initial_weights

    summary = train(zoo_tokens, tmp_path / "a", tiny_config(tokens=8 * 64 * 5))
    cfg = tiny_config(seed=1)
    model = build_model(cfg, 512)
    load_initial_weights(model, Path(summary["model"]))
    saved = AutoModelForCausalLM.from_pretrained(summary["model"]).float().state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gpu_script_trains_from_packed_tokens_on_cpu(zoo_tokens: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    packed = pack_tokens(zoo_tokens, tmp_path / "packed")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TOKENS": str(packed), "PYTHON": sys.executable,
           "LAYERS": "1", "D_MODEL": "32", "HEADS": "2", "CTX": "32", "BATCH": "4", "TRAIN_TOKENS": "1280",
           "WARMUP": "2", "DEVICE": "cpu", "RUN": str(tmp_path / "run"), "EVALUATE": "0"}  # fmt: skip
    script = Path(__file__).parents[1] / "zoo" / "gpu_train.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 10
    import tarfile

    with tarfile.open(tmp_path / "out" / "mri-base.tar") as tar:
        names = set(tar.getnames())
    assert {"mri-base/model.safetensors", "mri-base/config.json", "mri-base/tokenizer.json"} <= names
    assert (tmp_path / "out" / "loss.png").exists()


def test_fit_to_time_completes_the_schedule_inside_the_limit(zoo_tokens: Path, tmp_path: Path) -> None:
    """A run planned far too long for its time limit still ends its warmup + cosine: the last LR is the floor."""
    from mri.zoo.train import FIT_STEPS, lr_at

    cfg = tiny_config(tokens=8 * 64 * 1_000_000, time_limit=4.0, fit_to_time=True, log_every=1)
    summary = train(zoo_tokens, tmp_path / "run", cfg)
    assert summary["finished"] and summary["schedule_complete"]
    assert 1.5 * FIT_STEPS < summary["planned_steps"] < cfg.steps
    assert summary["elapsed_s"] < 4.0 * 1.5
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    last_lr = state["train"][-1][2]
    assert last_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)
    assert last_lr == pytest.approx(lr_at(cfg, summary["planned_steps"] - 1, summary["planned_steps"]))


def test_count_tokens_fills_the_manifest_with_what_pretokenize_wrote(
    zoo_tokens: Path, tmp_path: Path
) -> None:
    import shutil

    from mri.zoo.tokens import count_tokens, tokens_info

    info = tokens_info(zoo_tokens)
    corpus = Path(shutil.copytree(info["corpus"], tmp_path / "corpus"))  # the fixture's corpus stays as built
    counted = count_tokens(corpus, zoo_tokens / "tokenizer")
    manifest = json.loads((corpus / "manifest.json").read_text())
    for split in ("train", "val"):
        expected = {
            s: n for s, n in info["counts"][split].items() if s != "facts"
        }  # facts come from world.json
        assert counted["counts"][split] == expected
        assert {s: e[f"{split}_tokens"] for s, e in manifest["sources"].items()} == expected
    for source, entry in manifest["sources"].items():
        assert entry["tokens"] == info["counts"]["train"][source] + info["counts"]["val"][source] > 1000
    assert (
        manifest["totals"]["tokens"]
        == counted["totals"]["tokens"]
        == sum(e["tokens"] for e in manifest["sources"].values())
    )
    assert manifest["token_counting"]["tokenizer_sha256"] == info["tokenizer_sha256"]
    assert not list(corpus.glob("*.tmp*")) and not list(corpus.glob(".manifest*"))


def test_count_tokens_refuses_a_missing_or_incomplete_corpus(zoo_tokens: Path, tmp_path: Path) -> None:
    import shutil

    from mri.zoo.tokens import count_tokens, tokens_info

    with pytest.raises(MriError, match="not a finished corpus"):
        count_tokens(tmp_path, zoo_tokens / "tokenizer")
    corpus = Path(shutil.copytree(tokens_info(zoo_tokens)["corpus"], tmp_path / "corpus"))
    (corpus / "val.parquet").unlink()
    before = (corpus / "manifest.json").read_text()
    with pytest.raises(MriError, match=r"incomplete: val\.parquet listed by its manifest are missing"):
        count_tokens(corpus, zoo_tokens / "tokenizer")
    with pytest.raises(MriError, match="incomplete"):
        pretokenize(corpus, zoo_tokens / "tokenizer", tmp_path / "tokens")
    assert (corpus / "manifest.json").read_text() == before and not (tmp_path / "tokens").exists()


def _no_disk(monkeypatch: pytest.MonkeyPatch, free: int = 10_000_000) -> None:
    """The OS reports only `free` bytes free on every disk."""
    import shutil

    real = shutil.disk_usage

    def tiny(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", tiny)


def test_train_checks_the_disk_first_and_leaves_no_folder(
    zoo_tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tokens folder whose shards are missing: loading them would fail, so the disk error proves it came first.
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    (hollow / "tokens.json").write_text((zoo_tokens / "tokens.json").read_text())
    with pytest.raises(MriError, match="no token arrays"):
        train(hollow, tmp_path / "run", tiny_config())
    assert not (tmp_path / "run").exists()
    _no_disk(monkeypatch)
    with pytest.raises(MriError, match=r"only 0\.01 GB free .*training needs about 0\.0[0-9] GB"):
        train(hollow, tmp_path / "run" / "deeper", tiny_config())
    assert not (tmp_path / "run").exists()


def test_pretokenize_and_pack_check_the_disk_first(
    zoo_tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tokens_info_corpus(zoo_tokens)
    _no_disk(monkeypatch, free=1000)
    with pytest.raises(MriError, match="pretokenizing needs about"):
        pretokenize(corpus, zoo_tokens / "tokenizer", tmp_path / "tokens")
    with pytest.raises(MriError, match="packing the tokens needs about"):
        pack_tokens(zoo_tokens, tmp_path / "packed")
    assert list(tmp_path.iterdir()) == []


def tokens_info_corpus(tokens: Path) -> Path:
    from mri.zoo.tokens import tokens_info

    return Path(tokens_info(tokens)["corpus"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"batch": 0}, "--batch"), ({"ctx": 0}, "--ctx"), ({"time_limit": -1.0}, "--time-limit"),
     ({"fit_to_time": True}, "--fit-to-time")],
)  # fmt: skip
def test_train_refuses_configs_that_cannot_run(zoo_tokens: Path, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(MriError, match=message):
        train(zoo_tokens, tmp_path / "run", tiny_config(**overrides))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_documented_tiny_recipe_retrains_from_the_shipped_sample_in_well_under_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The recipe in docs/zoo.md, run line by line through the `mri` entry point: from the corpus sample
    shipped with mri, a tiny organism of mri-tiny's architecture learns in well under a minute of CPU
    (measured: 16.4 s of CPU, loss 8.84 -> 5.36, world validation loss 4.7)."""
    import re
    import shlex
    import sys
    import time

    from mri.cli import app

    doc = (Path(__file__).parents[1] / "docs" / "zoo.md").read_text()
    block = re.search(r"```bash\n(mri zoo pretokenize --tokenizer mri-tiny.*?)```", doc, re.S)
    assert block, "docs/zoo.md lost its tiny retraining recipe"
    lines = [shlex.split(line) for line in block.group(1).strip().splitlines()]
    assert [line[:3] for line in lines] == [["mri", "zoo", "pretokenize"], ["mri", "zoo", "train"]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MRI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", lines[0])
    app()
    counts = json.loads(capsys.readouterr().out)
    assert sum(counts["train"].values()) > 500_000 and counts["train"]["facts"] > 0
    monkeypatch.setattr(sys, "argv", lines[1])
    cpu = time.process_time()
    app()
    cpu = time.process_time() - cpu
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["steps"] == 100
    assert cpu < 45, f"the tiny recipe took {cpu:.1f} s of CPU (measured 16.4 s)"
    state = json.loads((tmp_path / "tiny-run" / "checkpoint" / "state.json").read_text())
    assert state["train"][-1][1] < state["train"][0][1] - 2.5  # measured 8.84 -> 5.36
    assert summary["val"]["world"] < 6.0  # measured 4.7; uniform is ln 8192 = 9.01
    assert np.mean(list(summary["val"].values())) < 8.0  # measured 7.4
    config = json.loads((tmp_path / "tiny-run" / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (2, 64, 8192)
