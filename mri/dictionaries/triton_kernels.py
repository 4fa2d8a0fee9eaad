"""Triton kernels for the sparse parts of a TopK step on a GPU, where PyTorch's general kernels are slow.

Measured on an H100 (bench/gpu_step.py, 768 x 32,768 latents, k 32, 4,096 tokens): `F.embedding_bag` and
its backward took 1.9 ms of a 5.3 ms step, the decoder's row projections and renormalisation 0.4 ms more.
Each kernel here reads what it needs once and writes its result once:

- `bag_sum`: out[b] = sum over j in bag b of w[j] * table[idx[j]], bags given by sorted start offsets. The
  decoder's forward (bags = rows), and both weight gradients (bags = latents, pairs sorted by latent);
  every bag's row is written, so no zero-fill comes first.
- `pair_dots`: out[j] = A[a[j]] . B[b[j]]: the gradient of the decoder's per-pair weights.
- `remove_parallel` and `normalize_rows`: the unit-norm decoder's gradient projection and renormalisation,
  one row per program; `adam_rows`: both with the decoder's Adam step between them, in one pass.

Imported only when a CUDA tensor reaches `mri.dictionaries.sparse_kernels` and Triton is installed (it comes
with PyTorch's CUDA builds); on the CPU the PyTorch path runs. Under `TRITON_INTERPRET=1` the same kernels run
on CPU tensors, which is how the tests check them against PyTorch without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_D = 256
"""Columns per program of the gather kernels: 3 programs a row at d 768, 1 KiB of fp32 per gathered row."""


@triton.jit
def _bag_sum_kernel(
    idx_ptr, w_ptr, off_ptr, table_ptr, out_ptr, nnz, n_bags, d, stride_t, stride_o,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1, mask=b + 1 < n_bags, other=nnz)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(start, end, BLOCK_J):
        j = s + tl.arange(0, BLOCK_J)
        m = j < end
        idx = tl.load(idx_ptr + j, mask=m, other=0).to(tl.int64)
        w = tl.load(w_ptr + j, mask=m, other=0.0).to(tl.float32)
        rows = tl.load(
            table_ptr + idx[:, None] * stride_t + cols[None, :], mask=m[:, None] & cmask[None, :], other=0.0
        )
        acc += tl.sum(rows.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + b.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _pair_dots_kernel(
    a_ptr, A_ptr, stride_a, b_ptr, B_ptr, stride_b, out_ptr, nnz, d,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    m = j < nnz
    ia = tl.load(a_ptr + j, mask=m, other=0).to(tl.int64)
    ib = tl.load(b_ptr + j, mask=m, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mm = m[:, None] & (cols < d)[None, :]
        a = tl.load(A_ptr + ia[:, None] * stride_a + cols[None, :], mask=mm, other=0.0).to(tl.float32)
        bb = tl.load(B_ptr + ib[:, None] * stride_b + cols[None, :], mask=mm, other=0.0).to(tl.float32)
        acc += tl.sum(a * bb, axis=1)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _remove_parallel_kernel(g_ptr, w_ptr, d, stride_g, stride_w, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    g = tl.load(g_ptr + r * stride_g + cols, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + r * stride_w + cols, mask=cm, other=0.0).to(tl.float32)
    g = g - tl.sum(g * w, axis=0) * w
    tl.store(g_ptr + r * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _normalize_rows_kernel(w_ptr, skip_ptr, d, stride_w, BLOCK_D: tl.constexpr, HAS_SKIP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    w = tl.load(w_ptr + r * stride_w + cols, mask=cm, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-12)
    tl.store(w_ptr + r * stride_w + cols, (w / norm).to(w_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _adam_rows_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, lr_value, skip_ptr, d, stride, beta1, beta2, eps,
    BLOCK_D: tl.constexpr, UNIT: tl.constexpr, LR_PTR: tl.constexpr, HAS_SKIP: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    at = r * stride + cols
    g = tl.load(g_ptr + at, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + at, mask=cm, other=0.0).to(tl.float32)
    if UNIT:
        g = g - tl.sum(g * w, axis=0) * w
    m = beta1 * tl.load(m_ptr + at, mask=cm, other=0.0) + (1 - beta1) * g
    v = beta2 * tl.load(v_ptr + at, mask=cm, other=0.0) + (1 - beta2) * g * g
    step = tl.load(step_ptr).to(tl.float32)
    correction1 = 1 - tl.exp2(step * tl.log2(beta1))
    correction2 = 1 - tl.exp2(step * tl.log2(beta2))
    if LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    w = w - (lr / correction1) * m / (tl.sqrt(v) / tl.sqrt(correction2) + eps)
    if UNIT:
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-12)
    tl.store(w_ptr + at, w.to(w_ptr.dtype.element_ty), mask=cm)
    tl.store(m_ptr + at, m, mask=cm)
    tl.store(v_ptr + at, v, mask=cm)


def adam_rows(
    w: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor | float,
    betas: tuple[float, float],
    eps: float,
    *,
    unit: bool,
    skip: torch.Tensor | None = None,
) -> None:
    """One Adam step on a (n, d) fp32 weight, a row per program, after `step` (a device scalar) was
    counted up; with `unit`, the unit-norm decoder's whole update in the one pass: the gradient's part along
    each row removed first, the row renormalised after (three passes over the weights and their gradient
    otherwise: projection, Adam, renormalisation). As torch's fused Adam (no weight decay, no amsgrad);
    nothing changes where the device scalar `skip` is nonzero."""
    n, d = w.shape
    if not n:
        return
    _adam_rows_kernel[(n,)](
        w, grad, exp_avg, exp_avg_sq, step, lr if isinstance(lr, torch.Tensor) else w,
        0.0 if isinstance(lr, torch.Tensor) else float(lr), w if skip is None else skip,
        d, w.stride(0), float(betas[0]), float(betas[1]), float(eps),
        BLOCK_D=triton.next_power_of_2(d), UNIT=unit, LR_PTR=isinstance(lr, torch.Tensor), HAS_SKIP=skip is not None,
    )  # fmt: skip


def adam_rows_work(device: torch.device, d: int) -> bool:
    """Whether `adam_rows` builds and runs here, in each variant a trainer launches (the LR as a number or
    a tensor, with and without a skip flag), tried on one throwaway row; False (and a warning) if not."""
    try:
        w = torch.nn.functional.normalize(torch.ones(1, d, device=device), dim=1)
        state = [torch.zeros(1, d, device=device) for _ in range(3)]
        step = torch.ones((), device=device)
        lr = torch.full((), 1e-3, device=device)
        for rate, skip in ((1e-3, None), (lr, None), (lr, torch.zeros((), device=device))):
            adam_rows(w, *state, step, rate, (0.9, 0.999), 1e-8, unit=True, skip=skip)
        return bool(torch.isfinite(w).all())
    except Exception as e:  # noqa: BLE001  an older Triton: the decoder steps through PyTorch instead
        import warnings

        warnings.warn(
            f"mri: the decoder's one-pass Adam kernel failed here ({type(e).__name__}: {e})", stacklevel=2
        )
        return False


MAX_ROW = 16384
"""Widest row `remove_parallel` and `normalize_rows` take (one row per program, held in registers)."""


def _bag_block(nnz: int, n_bags: int) -> int:
    """Pairs loaded at once: about a bag's mean size (k for TopK rows, ~nnz / n_latents for latents)."""
    mean = nnz / max(n_bags, 1)
    return int(min(32, max(4, triton.next_power_of_2(max(int(mean), 1)))))


def bag_sum(
    indices: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(n_bags, d) as `F.embedding_bag(indices, table, offsets, mode='sum', per_sample_weights=weights)`."""
    n_bags, nnz, d = offsets.shape[0], indices.shape[0], table.shape[1]
    out = torch.empty(n_bags, d, device=table.device, dtype=table.dtype)
    if n_bags == 0 or d == 0:
        return out
    table = table if table.stride(1) == 1 else table.contiguous()
    block_j = _bag_block(nnz, n_bags)
    # small bags (the weight gradients' ~4 pairs per latent): a whole row per program, as a third as many
    # programs each waiting out the same chain of dependent loads (offsets, indices, rows)
    block_d = min(1024, triton.next_power_of_2(d)) if block_j < 8 else _BLOCK_D
    grid = (n_bags, triton.cdiv(d, block_d))
    _bag_sum_kernel[grid](
        indices.contiguous(), weights.contiguous(), offsets.contiguous(), table, out,
        nnz, n_bags, d, table.stride(0), out.stride(0),
        BLOCK_J=block_j, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def pair_dots(a: torch.Tensor, A: torch.Tensor, b: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(nnz,) fp32: A[a[j]] . B[b[j]] for each pair j; A and B have the same width."""
    nnz, d = a.shape[0], A.shape[1]
    out = torch.empty(nnz, device=A.device, dtype=torch.float32)
    if nnz == 0:
        return out
    A = A if A.stride(1) == 1 else A.contiguous()
    B = B if B.stride(1) == 1 else B.contiguous()
    block_j = 16
    _pair_dots_kernel[(triton.cdiv(nnz, block_j),)](
        a.contiguous(), A, A.stride(0), b.contiguous(), B, B.stride(0), out, nnz, d,
        BLOCK_J=block_j, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    return out


def remove_parallel(g: torch.Tensor, w: torch.Tensor) -> None:
    """In place: g[r] -= (g[r] . w[r]) w[r] for every row r (w's rows of unit norm); rows of <= MAX_ROW."""
    n, d = g.shape
    if n:
        _remove_parallel_kernel[(n,)](g, w, d, g.stride(0), w.stride(0), BLOCK_D=triton.next_power_of_2(d))


def normalize_rows(w: torch.Tensor, skip: torch.Tensor | None = None) -> None:
    """In place: every row of w divided by its norm (at least 1e-12); rows of <= MAX_ROW. With `skip` (a
    one-element tensor on w's device), nothing changes where it is nonzero: decided on the device, so a
    captured CUDA graph can leave the weights of a step with a non-finite loss as they were."""
    n, d = w.shape
    if n:
        _normalize_rows_kernel[(n,)](
            w, w if skip is None else skip, d, w.stride(0),
            BLOCK_D=triton.next_power_of_2(d), HAS_SKIP=skip is not None,
        )  # fmt: skip
