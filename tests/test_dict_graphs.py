"""The captured-step path of the Trainer (CUDA graphs), run on the CPU with a stand-in for the graph that
re-runs the captured function on each replay: the static input buffers, the LR tensors, the switch to eager
steps while latents are dead, and the on-device skip of a step whose loss is not finite."""

from __future__ import annotations

import pytest
import torch

from mri.dictionaries import DictConfig, SparseCoder, TrainConfig, Trainer, build
from mri.dictionaries import trainer as trainer_module
from mri.errors import MriError


class _Rerun:
    """Stands in for `_CudaReplay`: capturing runs nothing (as on a GPU), replaying runs the step."""

    captured = 0

    def __init__(self, step, stream):
        self.step = step
        type(self).captured += 1
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.step()


def _trainer(
    graphs: bool,
    steps: int = 8,
    dead_tokens: int = 10**9,
    n_latents: int = 96,
    arch: str = "topk",
    topk_warmup: float = 0.5,
) -> Trainer:
    cfg = DictConfig(
        kind="sae", arch=arch, d_in=16, n_latents=n_latents, k=4, sites_in=["x"], sites_out=["x"]
    )
    train = TrainConfig(
        tokens=steps * 64,
        batch_size=64,
        cuda_graphs=graphs,
        dead_tokens=dead_tokens,
        sparsity_warmup_fraction=0.75,  # the L1 / L0 coefficient still moves while steps are replayed
        topk_warmup_fraction=topk_warmup,  # BatchTopK selects per row for 4 of 8 steps, then batch-wide
    )
    return Trainer([SparseCoder(cfg, seed=0)], train)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(64, 16, generator=g) * torch.linspace(0.3, 2, 16)} for _ in range(n)]


@pytest.fixture
def rerun(monkeypatch):
    monkeypatch.setattr(trainer_module, "_replay_factory", _Rerun)
    _Rerun.captured = 0
    return _Rerun


@pytest.mark.parametrize(
    ("arch", "dead_tokens"),
    [("topk", 10**9), ("topk", 3 * 64), ("batchtopk", 3 * 64), ("jumprelu", 3 * 64), ("relu", 3 * 64)]
    + [("gated", 3 * 64)],
)
def test_replayed_steps_train_as_eager_steps(rerun, arch, dead_tokens):
    """Same weights, metrics and Adam state as eager steps. With latents dying after 3 batches, a second graph
    runs AuxK in fixed shapes (the top aux_k of all latents, the live ones masked out) and must agree with
    the eager AuxK, which picks among the dead latents' columns only. BatchTopK's captured step keeps all
    k x batch pairs it selects (the non-positive at zero); eagerly it drops those; the end of its TopK
    warm-up drops the graphs captured before it, as JumpReLU's does. The dense archs (no AuxK) replay one graph, their sparsity
    coefficient still warming up (filled into it before each replay)."""
    batches = _batches(8)
    n = 128  # enough that more latents die than AuxK takes a row (8) as well as fewer
    replayed = _trainer(True, dead_tokens=dead_tokens, n_latents=n, arch=arch)
    eager = _trainer(False, dead_tokens=dead_tokens, n_latents=n, arch=arch)
    assert isinstance(replayed.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert not isinstance(eager.optimizer.param_groups[0]["lr"], torch.Tensor)
    lr = replayed.optimizer.param_groups[0]["lr"]
    dead = []
    for b in batches:
        replayed.train_step(b)
        eager.train_step(b)
        assert replayed.metrics[0] == pytest.approx(eager.metrics[0], rel=1e-5, abs=1e-7)
        dead.append(round(eager.metrics[0]["dead"] * n))
        if arch == "batchtopk":  # the per-row steps leave the inference threshold alone
            assert (float(replayed.dicts[0].batch_threshold) == 0) == (replayed.step <= 4)
    if arch == "batchtopk":
        # steps 0-3 select per row (the TopK warm-up; the plain graph, captured at step 2, replays steps 2 and
        # 3) and leave the inference threshold at 0; at step 4 the batch-wide selection drops that graph and,
        # latents being dead by then, runs AuxK eagerly; its graph replays steps 5-7
        assert rerun.captured == 2 and set(replayed._graph) == {True} and replayed._graph[True].replays == 3
        assert replayed.metrics[0]["auxk"] > 0
        thresholds = [float(t.dicts[0].batch_threshold) for t in (replayed, eager)]
        assert thresholds[0] > 0 and thresholds[0] == pytest.approx(thresholds[1])
    plain = replayed._graph.get(False)
    if arch == "batchtopk":
        pass  # checked above
    elif arch == "jumprelu":
        # steps 0-3 select per row (its TopK warm-up: thresholds tracked, no L0 penalty; the first graph replays
        # steps 2 and 3); the switch at step 4 drops that graph, runs eagerly, and the JumpReLU step's graph
        # replays steps 5-7
        assert rerun.captured == 2 and set(replayed._graph) == {False} and replayed.metrics[0]["sparsity"] > 0
        assert plain.replays == 3
    elif arch in ("relu", "gated"):
        assert rerun.captured == 1 and set(replayed._graph) == {False} and replayed.metrics[0]["sparsity"] > 0
        assert plain.replays == 8 - Trainer.EAGER_BEFORE_CAPTURE
    elif dead_tokens > 10**8:
        assert rerun.captured == 1 and set(replayed._graph) == {False}
        assert plain.replays == 8 - Trainer.EAGER_BEFORE_CAPTURE
    else:
        # dead after steps 3..7 (the count read back with each step): fewer than aux_k (8) at first, then more
        # dead after each step (as read back with it, for the next): none for 3 steps, then fewer than AuxK
        # takes a row (8), then more (measured 0, 0, 0, 2, 12, 10, 13, 9)
        assert dead[:3] == [0, 0, 0] and all(n > 0 for n in dead[3:]) and min(dead[3:]) < 8 < max(dead[3:])
        assert rerun.captured == 2
        auxk = replayed._graph[True]
        assert replayed.metrics[0]["auxk"] > 0
        # steps 2 and 3 replay the plain graph; step 4, the first with dead latents, runs AuxK eagerly; then
        # the AuxK graph is captured and replayed
        assert plain.replays == 2 and auxk.replays == 3
    for (name, a), b in zip(replayed.dicts[0].named_parameters(), eager.dicts[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    params = zip(replayed.dicts[0].named_parameters(), eager.dicts[0].parameters(), strict=True)
    for (name, pa), pb in params:
        sa, sb = replayed.optimizer.state[pa], eager.optimizer.state[pb]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7, msg=name)
        # JumpReLU's thresholds take no gradient in its TopK warm-up (steps 0-3): Adam steps them from 4 on
        assert float(sa["step"]) == float(sb["step"]) == (4 if name == "log_threshold" else 8), name
    # the LR schedule reaches a captured step through the tensor it was captured with, filled each step
    assert replayed.optimizer.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(eager.optimizer.param_groups[0]["lr"])
    assert not replayed.optimizer.param_groups[0]["capturable"]  # only while capturing


def test_a_replayed_step_with_a_non_finite_loss_leaves_the_weights(rerun):
    t = _trainer(True)
    for b in _batches(4):
        t.train_step(b)
    assert t._graph[False].replays == 2
    before = {n: p.detach().clone() for n, p in t.dicts[0].named_parameters()}
    steps = [float(s["step"]) for s in t.optimizer.state_dict()["state"].values()]
    bad = _batches(1)[0]
    bad["x"][5, 3] = float("nan")
    with pytest.raises(MriError, match="NaN or inf activations at x"):
        t.train_step(bad)
    assert t._graph[False].replays == 3  # it ran as the captured step
    for n, p in t.dicts[0].named_parameters():
        assert torch.equal(p, before[n]), n
    assert [float(s["step"]) for s in t.optimizer.state_dict()["state"].values()] == steps
    t.train_step(_batches(5)[4])  # and training goes on from there
    assert all(torch.isfinite(p).all() for p in t.dicts[0].parameters())


def test_checkpoints_of_a_captured_trainer_resume(rerun, tmp_path):
    """The LR tensors are written as numbers and a resumed trainer (eager, here) goes on exactly."""
    batches = _batches(6)
    t = _trainer(True, steps=6)
    t.fit(batches[:4], progress=False, until=4)
    t.save_checkpoint(tmp_path / "ck")
    again = Trainer.resume(tmp_path / "ck")
    assert isinstance(again.optimizer.param_groups[0]["lr"], torch.Tensor)  # ready to capture again
    t.fit(batches, progress=False)
    again.fit(batches, progress=False)
    for a, b in zip(t.dicts[0].parameters(), again.dicts[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_which_setups_capture_and_what_memory_they_are_told_to_hold():
    """Captured steps for any dictionary on one CUDA device, in one process; `mri dict train`'s memory
    estimate then counts the two graphs' private copies of the gradients and working memory."""
    from mri.dictionaries.memory import estimate
    from mri.dictionaries.trainer import captures_steps

    def cfg(kind="sae", arch="topk"):
        sites = (["a", "b"], ["c", "d"]) if kind == "clt" else (["a"], ["a" if kind == "sae" else "b"])
        return DictConfig(
            kind=kind, arch=arch, d_in=8, n_latents=32, k=2, sites_in=sites[0], sites_out=sites[1]
        )

    train = TrainConfig(tokens=128, batch_size=64)
    assert captures_steps([cfg(), cfg("transcoder")], train, "cuda")
    assert not captures_steps([cfg()], train, "cpu")
    assert not captures_steps([cfg()], train, "cuda:0", single=False)
    every = [cfg(arch=a) for a in ("topk", "batchtopk", "jumprelu", "relu", "gated")]
    assert captures_steps([*every, cfg("clt"), cfg("clt", "jumprelu")], train, "cuda")
    assert not captures_steps([cfg()], TrainConfig(tokens=128, batch_size=64, cuda_graphs=False), "cuda")
    plain, graphs = estimate([cfg()], train), estimate([cfg()], train, graphs=True)
    assert plain.graph_pools == 0 and graphs.graph_pools == 2 * (plain.gradients + plain.activations)
    assert graphs.total == plain.total + graphs.graph_pools and "CUDA graphs" in graphs.describe()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_replayed_clt_steps_train_as_eager_steps(rerun, arch):
    """A cross-layer transcoder's captured steps: every layer runs AuxK with its dead count on the device
    (zero where none of its latents is dead), against eager steps that skip those layers; ReLU's L1."""
    g = torch.Generator().manual_seed(1)
    batches = [
        {s: torch.randn(64, 16, generator=g) * torch.linspace(0.3, 2, 16) for s in ("a", "b", "c", "d")}
        for _ in range(8)
    ]

    def run(graphs: bool) -> Trainer:
        cfg = DictConfig(
            kind="clt", arch=arch, d_in=16, n_latents=128, k=4, sites_in=["a", "b"], sites_out=["c", "d"]
        )
        train = TrainConfig(
            tokens=8 * 64, batch_size=64, cuda_graphs=graphs, dead_tokens=3 * 64, auxk=True,
            sparsity_warmup_fraction=0.75, topk_warmup_fraction=0.0,  # BatchTopK batch-wide from step 0
        )  # fmt: skip
        t = Trainer([build(cfg, seed=0)], train)
        for b in batches:
            t.train_step(b)
        return t

    replayed, eager = run(True), run(False)
    if arch == "relu":  # nothing dies here; the L1 coefficient warms up through the captured steps
        assert replayed._graph[False].replays == 6 and replayed.metrics[0]["sparsity"] > 0
    else:
        assert replayed._graph[False].replays >= 1 and replayed.metrics[0]["dead"] > 0
        assert replayed.metrics[0]["auxk"] > 0 and replayed._graph[True].replays >= 1
    assert replayed.metrics[0] == pytest.approx(eager.metrics[0], rel=1e-5, abs=1e-7)
    for (name, a), b in zip(replayed.dicts[0].named_parameters(), eager.dicts[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
