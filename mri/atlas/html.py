"""Self-contained HTML dashboards: one page per feature plus an index, inline CSS and SVG, no scripts or
network, so they open from disk anywhere (atlas/html/feature-<i>.html, atlas/html/index.html)."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from mri.atlas.reader import Atlas

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
.label{font-size:1.1em;color:#333;margin:.3em 0 1em}.muted{color:#777}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.6;margin:4px 0;padding:4px 6px;
border-left:3px solid #ddd}.ex.score{border-left-color:#7aa7d8}.ex.explain{border-left-color:#e0a040}
.tok{border-radius:2px}.peak{outline:1px solid #c05000}.tag{font:11px system-ui;color:#777;margin-right:6px}
.cols{display:flex;gap:3em;flex-wrap:wrap}a{color:#1a5fb4;text-decoration:none}
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def histogram_svg(hist: list[int], edges: list[float], width: int = 640, height: int = 140) -> str:
    """Bars over the non-empty range of a log-binned histogram, with the activation range as axis labels."""
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        return "<p class='muted'>never fired</p>"
    lo, hi = nz[0], nz[-1] + 1
    counts = hist[lo:hi]
    top = max(counts)
    bw = width / len(counts)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{height - 20 - (c / top) * (height - 30):.1f}' width='{max(bw - 1, 1):.1f}' "
        f"height='{(c / top) * (height - 30):.1f}' fill='#e0a040'><title>{edges[lo + i]:.3g}–{edges[lo + i + 1]:.3g}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (
        f"<text x='0' y='{height - 4}' font-size='11'>{edges[lo]:.3g}</text>"
        f"<text x='{width}' y='{height - 4}' font-size='11' text-anchor='end'>{edges[hi]:.3g}</text>"
    )
    return f"<svg width='{width}' height='{height}' role='img' aria-label='activation histogram'>{bars}{axis}</svg>"


def example_html(ex: dict[str, Any], scale: float) -> str:
    """Tokens with a background whose strength is the activation relative to `scale`."""
    spans = []
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
        alpha = min(act / scale, 1.0) if scale > 0 else 0.0
        style = f" style='background:rgba(230,120,0,{alpha:.2f})'" if act > 0 else ""
        cls = "tok peak" if i == ex["peak"] and act > 0 else "tok"
        spans.append(f"<span class='{cls}'{style} title='{act:.3g}'>{escape(tok)}</span>")
    tag = f"<span class='tag'>{escape(ex['kind'])} · {escape(ex['split'])} · max {ex['max_act']:.3g}</span>"
    return f"<div class='ex {escape(ex['split'])}'>{tag}{''.join(spans)}</div>"


def _score_text(f: dict[str, Any]) -> str:
    rows = []
    for e in f["explanations"]:
        if e["score"] is None or not math.isfinite(e["score"]):
            rows.append(
                f"<tr><td>{escape(e['scorer'])}</td><td colspan=2 class='muted'>no score-split examples</td></tr>"
            )
        else:
            rows.append(
                f"<tr><td>{escape(e['scorer'])}</td><td>{e['score']:.3f}</td>"
                f"<td class='muted'>95% CI {e['ci_low']:.3f}–{e['ci_high']:.3f} ({escape(e['explainer'])})</td></tr>"
            )
    return (
        f"<table>{''.join(rows)}</table>" if rows else "<p class='muted'>not explained yet (mri explain)</p>"
    )


def _token_table(title: str, tokens: list[str], values: list[float]) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(repr(t))}</code></td><td>{v:+.3f}</td></tr>"
        for t, v in zip(tokens, values, strict=True)
    )
    return f"<div><h3>{title}</h3><table>{rows}</table></div>"


def _links(ids: list[int], values: list[float], what: str) -> str:
    items = [
        f"<a href='feature-{i}.html'>#{i}</a> <span class='muted'>{what} {v:.2f}</span>"
        for i, v in zip(ids, values, strict=True)
        if i >= 0
    ]
    return ", ".join(items) or "<span class='muted'>none</span>"


def feature_page(f: dict[str, Any], atlas: Atlas) -> str:
    m = atlas.manifest
    label = escape(f["label"]) if f["label"] else "<span class='muted'>no label yet</span>"
    scale = f["max_act"]
    sections = []
    for kind, title in (
        ("top", "Top activations"),
        ("quantile", "Sampled activations (by rank quantile)"),
        ("random", "Non-activating"),
    ):
        exs = [e for e in f["examples"] if e["kind"] == kind]
        if kind == "quantile":
            exs.sort(key=lambda e: -(e["quantile"] or 0))
        body = "".join(example_html(e, scale) for e in exs) or "<p class='muted'>none</p>"
        sections.append(f"<h2>{title} ({len(exs)})</h2>{body}")
    body = (
        f"<p><a href='index.html'>← all features</a></p><h1>Feature {f['feature']}</h1>"
        f"<div class='label'>{label}</div>{_score_text(f)}"
        f"<p class='muted'>{escape(m['model'])} · {escape(m['site'])} · {m['tokens']:,} tokens</p>"
        f"<table><tr><th>density</th><th>fired</th><th>mean act</th><th>max act</th></tr>"
        f"<tr><td>{f['density']:.3%}</td><td>{f['fired']:,}</td><td>{f['mean_act']:.3g}</td><td>{f['max_act']:.3g}</td></tr></table>"
        f"<h2>Activation histogram (log-spaced bins)</h2>{histogram_svg(f['hist'], f['hist_edges'])}"
        f"<h2>Logit effects</h2><div class='cols'>{_token_table('Promoted', f['logit_pos_tokens'], f['logit_pos'])}"
        f"{_token_table('Suppressed', f['logit_neg_tokens'], f['logit_neg'])}</div>"
        f"<h2>Related features</h2><p>Co-firing: {_links(f['cofire_ids'], f['cofire_jaccard'], 'Jaccard')}</p>"
        f"<p>Nearest decoders: {_links(f['neighbour_ids'], f['neighbour_cos'], 'cos')}</p>"
        + "".join(sections)
        + "<p class='muted'>Orange edge: explain split (shown to explainers); blue edge: score split (held out).</p>"
    )
    return _page(f"Feature {f['feature']}", body)


def write_html(atlas: Atlas | str | Path, features: list[int] | None = None) -> Path:
    """Write html/feature-<i>.html for `features` (default all) and html/index.html; return the folder."""
    atlas = atlas if isinstance(atlas, Atlas) else Atlas(atlas)
    out = atlas.path / "html"
    out.mkdir(exist_ok=True)
    index_rows = []
    for f in atlas.iter_features(features):
        (out / f"feature-{f['feature']}.html").write_text(feature_page(f, atlas), encoding="utf-8")
        score = "" if f["score"] is None or not math.isfinite(f["score"]) else f"{f['score']:.2f}"
        index_rows.append(
            f"<tr><td><a href='feature-{f['feature']}.html'>{f['feature']}</a></td><td>{f['density']:.3%}</td>"
            f"<td>{f['max_act']:.3g}</td><td>{escape(f['label'] or '')}</td><td>{score}</td></tr>"
        )
    m = atlas.manifest
    body = (
        f"<h1>Atlas: {escape(m['model'])} · {escape(m['site'])}</h1>"
        f"<p class='muted'>{m['n_features']} features · {m['tokens']:,} tokens of {escape(str(m['corpus']))}</p>"
        "<table><tr><th>feature</th><th>density</th><th>max</th><th>label</th><th>score</th></tr>"
        + "".join(index_rows)
        + "</table>"
    )
    (out / "index.html").write_text(_page("Atlas", body), encoding="utf-8")
    return out


def _shaded(tokens: list[str], acts: list[float]) -> str:
    scale = max(acts, default=0.0)
    spans = []
    for tok, act in zip(tokens, acts, strict=True):
        alpha = min(act / scale, 1.0) if scale > 0 else 0.0
        style = f" style='background:rgba(230,120,0,{alpha:.2f})'" if act > 0 else ""
        cls = "tok peak" if act > 0 and act == scale else "tok"
        spans.append(f"<span class='{cls}'{style} title='{act:.3g}'>{escape(tok)}</span>")
    return "".join(spans)


def crosslingual_page(report: dict[str, Any]) -> str:
    """The cross-lingual report (`mri atlas crosslingual`): counts against the misaligned control, the
    features with most aligned hits, and examples with each language's tokens shaded by activation."""
    a, c = report["aligned"], report["control"]
    n = report["min_languages"]
    counts = "".join(
        f"<tr><td>{label}</td><td>{a[k]:,}</td><td>{c['mean'][k]:,.1f} ± {c['std'][k]:.1f}</td></tr>"
        for k, label in (
            ("hits", f"(passage, feature) pairs active in ≥ {n} languages"),
            ("hits_different_tokens", "… peaking on different tokens across languages"),
            ("hits_shared_token", "… peaking on one shared token (a name, a number)"),
            ("features", "distinct features"),
        )
    )
    top = "".join(
        f"<tr><td>{e['feature']}</td><td>{e['aligned']}</td><td>{e['control']:.1f}</td>"
        f"<td>{e['shared_token']}</td><td class='muted'>{escape(', '.join(e['passages'][:4]))}</td></tr>"
        for e in report["top_features"]
    )
    examples = []
    for ex in report["examples"]:
        rows = "".join(
            f"<div class='ex'><span class='tag'>{escape(lang)}</span>{_shaded(t['tokens'], t['acts'])}</div>"
            for lang, t in sorted(ex["texts"].items())
        )
        peaks = ", ".join(f"{k}: {v!r}" for k, v in sorted(ex["peak_tokens"].items()))
        examples.append(
            f"<h3>Feature {ex['feature']} on {escape(ex['passage'])}</h3>"
            f"<p class='muted'>active in {escape(', '.join(ex['languages']))}; peaks on {escape(peaks)}</p>{rows}"
        )
    langs = ", ".join(f"{k} ({v})" for k, v in report["languages"].items())
    body = (
        f"<h1>Features shared across languages: {escape(str(report.get('model', '')))} · {escape(report['site'])}</h1>"
        f"<p class='muted'>{report['passages']} aligned passages ({escape(str(report.get('source', {}).get('name', '')))}), "
        f"{report['texts']} texts in {escape(langs)}; {report['common_features_left_out']} features active on more "
        f"than {report['max_common']:.0%} of texts left out. Control: the same texts re-paired across passages "
        f"of similar length ({len(c['runs'])} runs).</p>"
        f"<table><tr><th></th><th>aligned</th><th>misaligned control</th></tr>{counts}</table>"
        f"<h2>Features with the most aligned hits beyond the control</h2>"
        f"<table><tr><th>feature</th><th>aligned passages</th><th>control (mean)</th><th>same peak token</th>"
        f"<th>passages</th></tr>{top}</table><h2>Examples</h2>{''.join(examples)}"
    )
    return _page("Cross-lingual features", body)
