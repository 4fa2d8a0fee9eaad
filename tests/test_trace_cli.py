"""`mri trace ...` end to end on a tiny model with saved random transcoders; validation by intervention."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mri
from mri.dictionaries import save
from mri.trace import ReplacementModel, attribute, read_graph, validate, write_graph
from mri.trace.commands import trace_app
from mri.trace.toy import random_transcoders


def test_validate_reports_edges_matching_interventions(tiny_model_dir, tmp_path):
    model = mri.load(tiny_model_dir("gpt_neox"))
    rm = ReplacementModel(model, random_transcoders(model, arch="topk", active=6))
    graph = attribute("The quick brown fox", rm, max_feature_nodes=40)
    data = read_graph(write_graph(graph, tmp_path / "g.json", node_threshold=1.0, edge_threshold=1.0))
    for factor in (2.0, 0.0):
        result = validate(data, rm, n_edges=6, factor=factor)
        assert len(result.edges) == 6
        assert result.max_error < 1e-3, result.table()
        assert all(e.predicted == e.weight * (factor - 1) for e in result.edges)
    assert "predicted" in result.table().splitlines()[0]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    folder = tiny_model_dir("llama")
    model = mri.load(folder)
    tcs = random_transcoders(model, active=6)
    root = tmp_path_factory.mktemp("tcs")
    dicts = [str(save(tcs.coders[i], root / f"tc{i}")) for i in range(model.n_layers)]
    return str(folder), dicts


def test_cli_run_validate_diff(saved, tmp_path):
    folder, dicts = saved
    runner = CliRunner()
    flags = [arg for d in dicts for arg in ("--dict", d)]
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    r = runner.invoke(
        trace_app, ["run", folder, *flags, "--prompt", "The quick brown fox", "--out", str(out_a)]
    )
    assert r.exit_code == 0, r.output
    assert "replacement" in r.output and out_a.is_file()
    data = json.loads(out_a.read_text())
    assert data["metadata"]["transcoder_list"] == ["tc0", "tc1", "tc2"]
    r = runner.invoke(
        trace_app,
        ["run", folder, *flags, "--prompt", "The quick brown dog", "--out", str(out_b), "--max-nodes", "20"],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(trace_app, ["validate", folder, str(out_a), *flags, "--edges", "4"])
    assert r.exit_code == 0, r.output
    assert "max relative error" in r.output
    r = runner.invoke(trace_app, ["diff", str(out_a), str(out_b)])
    assert r.exit_code == 0 and r.output.startswith("nodes +")
    r = runner.invoke(trace_app, ["heads", folder, "--top", "2"])
    assert r.exit_code == 0 and "previous_token: L" in r.output


def test_cli_run_device(saved, tmp_path):
    folder, dicts = saved
    runner = CliRunner()
    flags = [arg for d in dicts for arg in ("--dict", d)]
    flags += ["--prompt", "The quick brown fox", "--max-nodes", "20"]
    outs = {}
    for args in ([], ["--device", "cpu"]):
        out = tmp_path / f"g{len(args)}.json"
        r = runner.invoke(trace_app, ["run", folder, *flags, "--out", str(out), *args])
        assert r.exit_code == 0, r.output
        outs[len(args)] = json.loads(out.read_text())
    assert outs[0]["nodes"] == outs[2]["nodes"] and outs[0]["links"] == outs[2]["links"]
    r = runner.invoke(trace_app, ["run", folder, *flags, "--device", "gpu0"])
    assert r.exit_code != 0 and "is not a device" in str(r.exception)
    if not torch.cuda.is_available():
        r = runner.invoke(trace_app, ["run", folder, *flags, "--device", "cuda"])
        assert r.exit_code != 0 and "no CUDA GPU" in str(r.exception)
