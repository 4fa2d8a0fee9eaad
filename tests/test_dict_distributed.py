"""Data-parallel training: N processes on shares of each global batch train what one process trains on
the whole batches; only rank 0 writes."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mri.dictionaries import DictConfig, TrainConfig, Trainer, build
from mri.dictionaries.distributed import Ranks
from mri.dictionaries.toy import ToyFeatures

STEPS, BATCH = 24, 128


def _dictionaries() -> list:
    """One of each path that needs global batch statistics: TopK with AuxK, BatchTopK (global selection
    and threshold), JumpReLU (dense, L0 penalty), and a CLT with AuxK."""
    sae = {"d_in": 32, "sites_in": ["a"], "sites_out": ["a"]}
    return [
        DictConfig(kind="sae", arch="topk", n_latents=96, k=4, **sae),
        DictConfig(kind="sae", arch="batchtopk", n_latents=96, k=4, **sae),
        DictConfig(
            kind="transcoder", arch="jumprelu", d_in=32, n_latents=64, sites_in=["a"], sites_out=["b"]
        ),
        DictConfig(
            kind="clt", arch="topk", d_in=32, n_latents=48, k=3, sites_in=["a", "b"], sites_out=["b", "a"]
        ),
    ]


def _train_config() -> TrainConfig:
    return TrainConfig(tokens=STEPS * BATCH, batch_size=BATCH, lr=3e-3, dead_tokens=2 * BATCH, warmup_steps=2)


def _batches():
    """Global batches {a, b}: toy features at a, a fixed linear map of them at b."""
    toy = ToyFeatures(n_features=128, d=32, p=0.03, seed=0)
    mix = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 32**0.5
    for batch in toy.batches(BATCH, site="a"):
        yield {"a": batch["a"], "b": batch["a"] @ mix}


def _trained(ranks: Ranks) -> Trainer:
    torch.set_num_threads(1)
    trainer = Trainer([build(c, seed=i) for i, c in enumerate(_dictionaries())], _train_config(), ranks=ranks)
    trainer.fit(ranks.split(_batches()), progress=False)
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v.detach().clone() for i, d in enumerate(trainer.dicts) for k, v in d.state_dict().items()
    }


def _worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        trainer = _trained(Ranks(rank, world))
        save_file(_weights(trainer), f"{folder}/rank{rank}.safetensors")
        trainer.save_checkpoint(f"{folder}/ckpt{rank}")
    finally:
        tdist.destroy_process_group()


def test_two_processes_train_what_one_trains(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    one = _weights(_trained(Ranks()))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for name, want in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "ckpt0").is_dir() and not (tmp_path / "ckpt1").exists()  # rank 0 alone writes
