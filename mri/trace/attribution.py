"""`attribute`: an attribution graph for one prompt, by batched backward passes through the frozen
replacement model.

A row of the adjacency matrix is one backward pass: inject a target's input direction (a feature's
encoder row at its MLP input, or a logit's unembedding direction minus the mean at the final norm's
output) and contract the gradient at every MLP output with each source feature's decoder row times its
activation (and with each error vector), and at the token embedding with each token's embedding. Because
the frozen model is affine, these contractions are exact direct effects. Rows are computed for the logits
first, then for features in order of their estimated influence on the logits, up to `max_feature_nodes`:
the matrix stays (rows visited) x (active features + errors + tokens), never active x active.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from mri.errors import MriError
from mri.trace.graph import Graph
from mri.trace.replacement import ReplacementModel, Snapshot


@torch.no_grad()
def salient_logits(
    logits: torch.Tensor, unembed: torch.Tensor, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fewest top tokens whose probabilities add up to `desired_logit_prob` (at most `max_n_logits`).

    logits: (vocab,); unembed: (vocab, d_model). Returns ids (k,), probabilities (k,) and directions
    (k, d_model): each token's unembedding row minus the mean row.
    """
    probs = torch.softmax(logits.float(), -1)
    top_p, top_i = probs.topk(min(max_n_logits, probs.numel()))
    cut = int(torch.searchsorted(top_p.cumsum(0), top_p.new_tensor(desired_logit_prob))) + 1
    top_p, top_i = top_p[:cut], top_i[:cut]
    return top_i, top_p, unembed[top_i] - unembed.mean(0)


def target_ids(targets: Sequence[str | int], model) -> torch.Tensor:
    """(k,) vocabulary ids of `targets`: ids, or texts that are exactly one token each; MriError otherwise."""
    vocab = int(model.hf.get_output_embeddings().weight.shape[0])
    ids = []
    for t in targets:
        if isinstance(t, str):
            encoded = model.to_tokens(t, bos=False)[0].tolist() if t else []
            if len(encoded) != 1:
                pieces = [model.tokenizer.decode([i]) for i in encoded]
                raise MriError(
                    f"target {t!r} is {len(encoded)} tokens {pieces}, not one; give a single token (e.g. "
                    f"{pieces[0]!r}) or a token id"
                    if pieces
                    else f"target {t!r} has no tokens"
                )
            ids.append(encoded[0])
        elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab:
            ids.append(t)
        else:
            raise MriError(f"target {t!r} is not a token: give a token's text or an id in 0..{vocab - 1}")
    if not ids:
        raise MriError("give at least one target token")
    if len(set(ids)) != len(ids):
        raise MriError(f"target tokens repeat: {list(targets)}")
    return torch.tensor(ids, dtype=torch.long, device="cpu")


@contextmanager
def _no_param_grads(*modules: torch.nn.Module) -> Iterator[None]:
    """Weights never need gradients here; turning them off keeps autograd from saving inputs for them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Contraction:
    """Gradient at MLP outputs -> one edge weight per active feature, one batched matmul per source layer.

    For source layer l the decoder rows (times activations) of its active features are packed per position,
    padded to the busiest position: (pos, slots, targets * d_out).
    """

    def __init__(self, rm: ReplacementModel, snap: Snapshot):
        tc = rm.transcoders
        self.n_pos = snap.n_pos
        device = snap.features.device
        self.layers: list[tuple[int, list[int], torch.Tensor, torch.Tensor]] = []
        feats, acts = snap.features, snap.activations
        for layer in tc.layers:
            idx = (feats[:, 0] == layer).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            pos, lat = feats[idx, 1], feats[idx, 2]
            vecs = acts[idx, None] * tc.decoder_direction(layer, lat)
            counts = torch.bincount(pos, minlength=self.n_pos)
            slots = int(counts.max())
            start = torch.cumsum(counts, 0) - counts
            slot = torch.arange(idx.numel(), device=device) - start[pos]
            packed = vecs.new_zeros(self.n_pos, slots, vecs.shape[1])
            packed[pos, slot] = vecs
            columns = torch.full((self.n_pos, slots), -1, dtype=torch.long, device=device)
            columns[pos, slot] = idx
            self.layers.append((layer, tc.targets(layer), packed.transpose(1, 2), columns))

    def __call__(self, grads: list[torch.Tensor | None], out: torch.Tensor) -> None:
        """Write (batch, n_active) edge weights into `out` from per-layer (batch, pos, d_out) grads."""
        for _, targets, packed, columns in self.layers:
            parts = [grads[t] for t in targets]
            if all(g is None for g in parts):
                continue
            parts = [
                torch.zeros_like(next(g for g in parts if g is not None)) if g is None else g for g in parts
            ]
            g = torch.cat(parts, -1).transpose(0, 1)  # (pos, batch, targets * d_out)
            r = torch.bmm(g, packed).transpose(0, 1)  # (batch, pos, slots)
            valid = columns >= 0
            out[:, columns[valid]] = r[:, valid]


def _partial_influence(
    rows: torch.Tensor, row_node: torch.Tensor, logit_probs: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """(n_columns,) influence on the logits of every source, through the rows computed so far.

    rows: (n_rows, n_columns), logit rows first; row_node: (n_rows,) the column of each row's own node
    (-1 for logits). The same as iterating `weight @ normalized(rows)`, `chunk` rows at a time, so that no
    copy of `rows` is made (it is the largest thing attribution holds).
    """
    n_rows = rows.shape[0]
    scale = rows.new_empty(n_rows)
    for a in range(0, n_rows, chunk):
        scale[a : a + chunk] = 1 / rows[a : a + chunk].abs().sum(1).clamp_min(1e-10)
    weight = rows.new_zeros(n_rows)
    weight[: logit_probs.numel()] = logit_probs.to(rows.dtype)
    is_feature = row_node >= 0
    total = rows.new_zeros(rows.shape[1])
    for _ in range(1000):
        w = weight * scale
        reach = torch.zeros_like(total)
        for a in w.nonzero().squeeze(1).div(chunk, rounding_mode="floor").unique().tolist():
            lo = a * chunk
            reach += w[lo : lo + chunk] @ rows[lo : lo + chunk].abs()
        if not bool(reach.any()):
            return total
        total += reach
        weight = torch.zeros_like(weight)
        weight[is_feature] = reach[row_node[is_feature]]
    raise RuntimeError("influence did not converge")


def to_ids(prompt: str | torch.Tensor | Sequence[int], model) -> torch.Tensor:
    """(pos,) token ids: a text is tokenized with BOS first; ids pass through."""
    if isinstance(prompt, str):
        return model.to_tokens(prompt)[0].cpu()
    ids = torch.as_tensor(prompt, dtype=torch.long, device="cpu").reshape(-1)
    if ids.numel() == 0:
        raise MriError("the prompt has no tokens")
    return ids


def attribute(
    prompt: str | torch.Tensor | Sequence[int],
    rm: ReplacementModel,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    max_feature_nodes: int | None = 7500,
    update_interval: int = 4,
    targets: Sequence[str | int] | None = None,
) -> Graph:
    """The attribution graph of `prompt` (a text, tokenized with BOS, or token ids) under `rm`.

    targets: the logit nodes, as token texts (one token each) or ids, in place of the most probable
    tokens (`max_n_logits`, `desired_logit_prob`); each is weighted by its probability.

    max_feature_nodes: features whose input edges are computed, the most influential first (None: all
    active features). batch_size: rows per backward pass. Memory is about (max_feature_nodes + logits) x
    (active features + (layers + 1) x pos) floats; the backward passes are batched with vmap over one
    forward pass, so the forward costs one copy of the prompt, not `batch_size`.
    """
    started = time.perf_counter()
    model = rm.model
    ids = to_ids(prompt, model)
    wanted = None if targets is None else target_ids(targets, model)
    snap = rm.prepare(ids)  # on the model's device, like everything attribution computes
    device = snap.embed.device
    tc = rm.transcoders
    n_layers, n_pos = rm.n_layers, snap.n_pos
    n_active = int(snap.features.shape[0])
    if wanted is None:
        logit_ids, logit_probs, logit_dirs = salient_logits(
            snap.logits[-1],
            rm.unembed.detach(),
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
        )
    else:
        W = rm.unembed.detach()
        logit_ids = wanted.to(device)
        logit_probs = torch.softmax(snap.logits[-1].float(), -1)[logit_ids]
        logit_dirs = W[logit_ids] - W.mean(0)
    n_logits = int(logit_ids.numel())
    n_rows = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    n_cols = n_active + (n_layers + 1) * n_pos
    batch = max(1, min(batch_size, max(n_rows, n_logits)))
    prepared = time.perf_counter()

    rows, row_node, visited, logits_done = _rows(
        rm, snap, logit_dirs, logit_probs, n_rows, batch, update_interval
    )

    selected = visited.nonzero().squeeze(1)
    keep = torch.cat([selected, torch.arange(n_active, n_cols, device=device)])
    n_sel = int(selected.numel())
    n_nodes = n_sel + (n_layers + 1) * n_pos + n_logits
    # the graph lives on the CPU, whatever the model's device
    adjacency = torch.zeros(n_nodes, n_nodes, device="cpu")
    order = torch.searchsorted(selected, row_node[n_logits:]).cpu()
    for a in range(0, n_rows, 1024):  # in chunks: a copy of all rows at once would double peak memory
        adjacency[order[a : a + 1024], : n_nodes - n_logits] = rows[n_logits + a : n_logits + a + 1024][
            :, keep
        ].cpu()
    adjacency[n_nodes - n_logits :, : n_nodes - n_logits] = rows[:n_logits][:, keep].cpu()
    del rows
    finished = time.perf_counter()

    tok = model.tokenizer
    return Graph(
        prompt=prompt if isinstance(prompt, str) else tok.decode(ids.tolist()),
        input_ids=ids,
        tokens=[tok.decode([i]) for i in ids.tolist()],
        features=snap.features[selected].cpu(),
        activations=snap.activations[selected].cpu(),
        logit_ids=logit_ids.cpu(),
        logit_probs=logit_probs.cpu(),
        logit_tokens=[tok.decode([i]) for i in logit_ids.tolist()],
        adjacency=adjacency,
        n_layers=n_layers,
        n_latents=tc.n_latents,
        info={
            "model": model.name,
            "dictionaries": tc.names,
            "n_active_features": n_active,
            "max_feature_nodes": max_feature_nodes,
            "max_n_logits": max_n_logits,
            "desired_logit_prob": desired_logit_prob,
            "targets": None if targets is None else logit_ids.tolist(),
            "batch_size": batch_size,
            "bos_excluded": snap.bos,
            "seconds": {
                "prepare": prepared - started,
                "logits": logits_done - prepared,
                "total": finished - started,
            },
        },
    )


def _rows(
    rm: ReplacementModel,
    snap: Snapshot,
    logit_dirs: torch.Tensor,
    logit_probs: torch.Tensor,
    n_rows: int,
    batch: int,
    update_interval: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Edge rows into the logits, then into `n_rows` features in order of estimated influence.

    Returns rows (n_logits + n_rows, n_active + (layers + 1) * pos), each row's own column (-1 for a
    logit), which features were visited, and when the logit rows were done.
    """
    model, tc = rm.model, rm.transcoders
    n_layers, n_pos = rm.n_layers, snap.n_pos
    n_active = int(snap.features.shape[0])
    n_logits = int(logit_dirs.shape[0])
    n_cols = n_active + (n_layers + 1) * n_pos
    device = snap.embed.device
    with _no_param_grads(model.hf, *[m for m in (tc.clt, *tc.coders.values()) if m is not None]):
        embed_leaf = torch.zeros(1, n_pos, model.d_model, device=device, requires_grad=True)
        out_leaves = [
            torch.zeros(1, n_pos, model.d_model, device=device, requires_grad=True) for _ in range(n_layers)
        ]

        def mlp_out(layer: int, x: torch.Tensor) -> torch.Tensor:
            return snap.mlp_out[layer] + out_leaves[layer] + rm._skip_delta(snap, layer, x)

        with torch.enable_grad():
            fp = rm.frozen_pass(snap, mlp_out, embed=snap.embed + embed_leaf, stop=True)
        contract = _Contraction(rm, snap)
        leaves = [embed_leaf, *out_leaves]

        def compute_rows(targets: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
            """(len(targets), n_cols) edge weights into targets (layer, pos, direction); layer n_layers
            means the final norm's output."""
            n = len(targets)
            inject: dict[int, torch.Tensor] = {}
            for i, (layer, pos, vec) in enumerate(targets):
                if layer not in inject:
                    inject[layer] = torch.zeros(n, 1, n_pos, model.d_model, device=device)
                inject[layer][i, 0, pos] = vec
            outputs = [fp.final if layer == n_layers else fp.mlp_in[layer] for layer in inject]
            grads = torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=list(inject.values()),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            grads = [None if g is None else g[:, 0] for g in grads]
            row = torch.zeros(n, n_cols, device=device)
            contract(grads[1:], row)
            for t, g in enumerate(grads[1:]):
                if g is not None:
                    start = n_active + t * n_pos
                    row[:, start : start + n_pos] = (g * snap.errors[t]).sum(-1)
            if grads[0] is not None:
                row[:, n_active + n_layers * n_pos :] = (grads[0] * snap.embed).sum(-1)
            return row

        rows = torch.zeros(n_logits + n_rows, n_cols, device=device)
        row_node = torch.full((n_logits + n_rows,), -1, dtype=torch.long, device=device)
        for i in range(0, n_logits, batch):
            chunk = range(i, min(i + batch, n_logits))
            rows[chunk.start : chunk.stop] = compute_rows(
                [(n_layers, n_pos - 1, logit_dirs[k]) for k in chunk]
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logits_done = time.perf_counter()

        visited = torch.zeros(n_active, dtype=torch.bool, device=device)
        filled = n_logits
        while filled < n_logits + n_rows:
            remaining = n_logits + n_rows - filled
            if n_rows == n_active:
                pending = (~visited).nonzero().squeeze(1)
            else:
                score = _partial_influence(rows[:filled], row_node[:filled], logit_probs)[:n_active]
                score[visited] = -1
                pending = score.argsort(descending=True)[: min(update_interval * batch, remaining)]
            pending = pending[snap.features[pending, 0].argsort(stable=True)]  # shallow batches stop early
            for chunk in pending.split(batch):
                targets = [
                    (layer, p, tc.W_enc(layer)[f].detach()) for layer, p, f in snap.features[chunk].tolist()
                ]
                rows[filled : filled + len(chunk)] = compute_rows(targets)
                row_node[filled : filled + len(chunk)] = chunk
                visited[chunk] = True
                filled += len(chunk)

    return rows, row_node, visited, logits_done
