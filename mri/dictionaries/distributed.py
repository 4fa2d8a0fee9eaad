"""Data-parallel training across torchrun ranks: every rank holds all the weights and its own rows of each
global batch, and the gradients are summed over ranks before each (identical) optimizer step.

Loss terms are normalised by statistics of the whole global batch (its row count, the targets' mean and
variance, BatchTopK's selection threshold), so each rank's loss is its share of the single-process loss and
the summed gradient is the single-process gradient: N ranks train the dictionary one process would on the
same global batches, up to the order of float sums.

Latent sharding (`mri.dictionaries.sharding`), where every rank holds a slice of the latents instead, uses
the same `Ranks` for its collectives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from mri.errors import MriError


class Ranks:
    """This process's place among `world` data-parallel ranks, and the collectives training needs.

    `Ranks()` is a single process: every collective is the identity.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise MriError(f"rank {rank} is outside a world of {world} processes")
        self.rank = rank
        self.world = world

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world})"

    @property
    def single(self) -> bool:
        return self.world == 1

    @property
    def main(self) -> bool:
        """Whether this rank writes outputs and checkpoints (rank 0)."""
        return self.rank == 0

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.single:
            return t
        import torch.distributed as tdist

        out = t.detach().clone()
        tdist.all_reduce(out, op=getattr(tdist.ReduceOp, op))
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (no grad)."""
        return self._reduce(t, "SUM")

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "MIN")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "MAX")

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """The global batch's row count, given this rank's `n`."""
        return self.sum(torch.tensor(float(n), device=device))

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether `flag` is true on some rank."""
        return bool(self.max(torch.tensor(int(flag), device=device)))

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `t` (equal shapes on all ranks), stacked in rank order."""
        if self.single:
            return t
        import torch.distributed as tdist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def part(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous share of `t` along `dim` (whose size divides by the world size)."""
        per = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * per, per)

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
        """On rank 0, every rank's `t` (equal shapes) joined along `dim` in rank order, on the CPU, one rank's
        share in flight at a time; None on the other ranks. `t` itself for a single process."""
        if self.single:
            return t
        import torch.distributed as tdist

        t = t.detach().contiguous()
        if not self.main:
            tdist.send(t, dst=0)
            return None
        parts = [t.to("cpu", copy=True)]
        buffer = torch.empty_like(t)
        for rank in range(1, self.world):
            tdist.recv(buffer, src=rank)
            parts.append(buffer.to("cpu", copy=True))
        return torch.cat(parts, dim)

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks, in place, in one flat all-reduce."""
        if self.single:
            return
        import torch.distributed as tdist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous share of the rows of a global batch {site: (batch, d)}."""
        if self.single:
            return batch
        out = {}
        for site, x in batch.items():
            if x.shape[0] % self.world:
                raise MriError(
                    f"a batch of {x.shape[0]} rows does not split over {self.world} processes; "
                    "use a --batch-size divisible by the number of processes"
                )
            per = x.shape[0] // self.world
            out[site] = x[self.rank * per : (self.rank + 1) * per]
        return out

    def split(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's rows of each global batch of `batches`."""
        for batch in batches:
            yield self.local_rows(batch)


def env_ranks() -> Ranks:
    """(rank, world size) from torchrun's environment; a single process outside it."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


@contextmanager
def process_group(device: str) -> Iterator[tuple[Ranks, str]]:
    """Join torch.distributed when under torchrun (gloo on CPU, nccl on CUDA, one GPU per local rank).

    Yields this process's `Ranks` and the device it trains on (`cuda` becomes `cuda:LOCAL_RANK`).
    """
    ranks = env_ranks()
    if ranks.single:
        yield ranks, device
        return
    import torch.distributed as tdist

    if not tdist.is_available():
        raise MriError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    created = not tdist.is_initialized()
    if created:
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        if tdist.get_world_size() != ranks.world:
            raise MriError(f"WORLD_SIZE is {ranks.world} but the process group has {tdist.get_world_size()}")
        yield ranks, device
        # Every rank meets here before the group is torn down: rank 0 still writes the dictionary after
        # the last step, and gloo aborts a rank whose peer closes its sockets first ("terminate called
        # without an active exception").
        tdist.barrier()
    finally:
        if created:
            tdist.destroy_process_group()
