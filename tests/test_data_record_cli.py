"""`mri record` end to end: killed with SIGKILL and rerun, or split over two torchrun ranks, it writes the
same bytes as one uninterrupted process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mri
from mri.data.reader import ActivationStore
from mri.data.record import record

REPO = Path(__file__).resolve().parents[1]
CLI = "from mri.cli import app; app()"
TOKENS = 12_000
SITES = ["L0.resid_post", "L2.mlp_out"]


def write_corpus(folder: Path, n_docs: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs".split()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(5, 120))))}) for _ in range(n_docs)
    ]
    (folder / "part.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def record_args(model: Path, corpus: Path, out: Path, tokens: int) -> list[str]:
    return [
        "record", str(model), "--corpus", str(corpus), "--sites", *SITES,
        "--tokens", str(tokens), "--out", str(out), "--ctx", "32", "--batch", "2", "--shard-tokens", "256",
    ]  # fmt: skip


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def same_store(a: Path, b: Path) -> None:
    """Every shard file byte-identical; manifests equal but for when and how they were made."""
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    for m in (ma, mb):
        assert m["complete"] is True
        del m["created"], m["command"]
    assert ma == mb


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    corpus = write_corpus(root / "corpus", 700)
    model = tiny_model_dir("llama")
    clean = root / "clean"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1), so the floats agree
    try:
        record(mri.load(model), corpus, SITES, TOKENS, clean, ctx_len=32, batch_size=2, shard_tokens=256,
               progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return model, corpus, clean, root


def test_kill_9_then_rerun_gives_the_same_bytes(setup) -> None:
    model, corpus, clean, root = setup
    out = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *record_args(model, corpus, out, TOKENS)],
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "shard-00001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False  # it really was cut short
    n_before = len(list(out.glob("shard-?????")))
    assert 1 <= n_before < len(json.loads((clean / "manifest.json").read_text())["shards"])
    done = run_cli(record_args(model, corpus, out, TOKENS))
    assert done.returncode == 0, done.stderr
    same_store(clean, out)
    ActivationStore(out).verify()


def test_two_torchrun_ranks_write_the_single_process_store(setup, tmp_path: Path) -> None:
    model, corpus, clean, _ = setup
    script = tmp_path / "cli.py"
    script.write_text(CLI + "\n")
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    done = subprocess.run(
        [*cmd, *record_args(model, corpus, out, TOKENS)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    same_store(clean, out)


def test_cli_errors_are_one_line(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    from mri.cli import app

    model, corpus, clean, _ = setup
    cases = [
        (record_args(model, tmp_path / "nope", tmp_path / "a", 100), "corpus not found"),
        (record_args(tmp_path, corpus, tmp_path / "b", 100), "is not a model folder"),
        ([*record_args(model, corpus, tmp_path / "c", 100), "--sites", "L9.resid_post"], "L9"),
        ([*record_args(model, corpus, clean, TOKENS), "--dtype", "bf16"], "dtype is 'fp16' there"),
        ([*record_args(model, corpus, tmp_path / "d", 100), "--dtype", "int8"], "unknown dtype"),
    ]
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["mri", *args])
        with pytest.raises(SystemExit) as exit_info:
            app()
        err = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2, err
        assert message in err and "Traceback" not in err
