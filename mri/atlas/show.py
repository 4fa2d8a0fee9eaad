"""`mri show ATLAS FEATURE`: one feature in the terminal — label, density, histogram sparkline, top examples
with the activating tokens highlighted, and logit effects."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mri.atlas.reader import Atlas

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(hist: list[int]) -> str:
    """The non-empty range of a histogram as one line of block characters."""
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        return ""
    counts = hist[nz[0] : nz[-1] + 1]
    top = max(counts)
    return "".join(
        " " if c == 0 else SPARK[min(int(c / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for c in counts
    )


def example_text(ex: dict[str, Any], scale: float) -> Text:
    """Tokens whose background deepens with activation (relative to `scale`); the peak is bold."""
    text = Text()
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
        tok = tok.replace("\n", "⏎")
        if act <= 0:
            text.append(tok)
            continue
        level = min(act / scale, 1.0) if scale > 0 else 0.0
        shade = int(40 + 180 * level)
        style = f"black on rgb(255,{255 - shade // 2},{255 - shade})" + (
            " bold underline" if i == ex["peak"] else ""
        )
        text.append(tok, style=style)
    return text


def render_feature(f: dict[str, Any], atlas: Atlas, n_examples: int = 8) -> Group:
    """A rich renderable of `atlas.feature(i)`."""
    label = f["label"] or "(no label yet: run `mri explain`)"
    score = (
        ""
        if f["score"] is None or not math.isfinite(f["score"])
        else f"  score {f['score']:.2f} ({f['scorer']})"
    )
    edges = f["hist_edges"]
    nz = [i for i, c in enumerate(f["hist"]) if c]
    span = f"{edges[nz[0]]:.2g} … {edges[nz[-1] + 1]:.2g}" if nz else ""
    head = Text.assemble(
        (f"{label}\n", "bold"),
        (
            f"density {f['density']:.3%}  fired {f['fired']:,}  mean {f['mean_act']:.3g}  max {f['max_act']:.3g}{score}\n",
            "dim",
        ),
        ("histogram ", "dim"),
        (sparkline(f["hist"]), "yellow"),
        (f"  {span}", "dim"),
    )
    examples = Table(show_header=True, box=None, padding=(0, 1))
    examples.add_column("max", justify="right", style="dim")
    examples.add_column("split", style="dim")
    examples.add_column("text")
    for ex in [e for e in f["examples"] if e["kind"] == "top"][:n_examples]:
        examples.add_row(f"{ex['max_act']:.3g}", ex["split"], example_text(ex, f["max_act"]))
    logits = Table(show_header=True, box=None, padding=(0, 1))
    for col in ("promoted", "", "suppressed", ""):
        logits.add_column(col)
    for a, va, b, vb in zip(
        f["logit_pos_tokens"], f["logit_pos"], f["logit_neg_tokens"], f["logit_neg"], strict=True
    ):
        logits.add_row(repr(a), f"{va:+.3f}", repr(b), f"{vb:+.3f}")
    related = Text(
        "co-firing: "
        + (
            ", ".join(
                f"#{i} ({j:.2f})" for i, j in zip(f["cofire_ids"], f["cofire_jaccard"], strict=True) if i >= 0
            )
            or "none"
        )
        + "\nnearest decoders: "
        + (
            ", ".join(
                f"#{i} ({c:.2f})"
                for i, c in zip(f["neighbour_ids"], f["neighbour_cos"], strict=True)
                if i >= 0
            )
            or "none"
        ),
        style="dim",
    )
    title = f"feature {f['feature']} · {atlas.manifest['site']}"
    return Group(Panel(head, title=title, expand=True), examples, logits, related)


def show_feature(
    atlas: Atlas | str, feature: int, console: Console | None = None, n_examples: int = 8
) -> None:
    """Print one feature of an atlas."""
    atlas = atlas if isinstance(atlas, Atlas) else Atlas(atlas)
    (console or Console()).print(render_feature(atlas.feature(feature), atlas, n_examples))
