"""The audit's folder: report.json (the schema in docs/audit.md), a self-contained report.html, and
manifest.json, written into a temporary sibling folder and renamed into place when complete."""

from __future__ import annotations

import html
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from mri.data.store import write_json_atomic
from mri.dictionaries.io import replace_folder

REPORT, PAGE, MANIFEST = "report.json", "report.html", "manifest.json"


def write_report(
    report: dict, out: str | Path, *, inputs: dict | None = None, command: str | None = None
) -> Path:
    """Write `report` to the folder `out` (replacing it whole) with its HTML page and manifest."""
    out = Path(out)
    manifest = {
        "kind": "audit",
        "format_version": report["format_version"],
        "model": report["model"],
        "base": report["base"],
        "dictionary": report["dictionary"],
        "inputs": inputs or {},
        "signals": report["signals"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command
        or ("mri " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mri") else "run_audit()"),
    }

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / REPORT, report)
        (tmp / PAGE).write_text(render_html(report))
        write_json_atomic(tmp / MANIFEST, manifest)

    return replace_folder(out, write)


def read_report(folder: str | Path) -> dict:
    """The report.json of an audit folder."""
    return json.loads((Path(folder) / REPORT).read_text())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if v is None:
        return "—"
    return str(v)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _finding(f: dict) -> str:
    badge = "high" if f["high_confidence"] else "low"
    parts = [
        f'<section class="finding {badge}"><h2>#{f["rank"]} {html.escape(f["kind"])}: '
        f"{html.escape(f['title'])}</h2>",
        f'<p class="conf">confidence {f["confidence"]:.2f} ({badge})</p>',
    ]
    if f.get("trigger"):
        parts.append(f"<p>trigger: <code>{html.escape(f['trigger'])}</code></p>")
    if f.get("behaviour"):
        parts.append(f"<p>behaviour: <code>{html.escape(f['behaviour'])}</code></p>")
    if f.get("causal"):
        cols = ["intervention", "selection", "n_features", "site", "rate", "rate_ablated", "removed",
                "rate_without", "rate_added", "induced", "log_odds", "log_odds_ablated", "kl",
                "kl_ablated"]  # fmt: skip
        used = [c for c in cols if any(c in row for row in f["causal"])]
        parts.append("<h3>causal check</h3>" + _table(f["causal"], used))
    if f.get("features"):
        rows = [
            {**x, "examples": " | ".join(e["context"] for e in x.get("examples", []))} for x in f["features"]
        ]
        cols = [
            c
            for c in ("feature", "attribution", "activation", "delta", "label", "examples")
            if any(c in r for r in rows)
        ]
        parts.append("<h3>features</h3>" + _table(rows, cols))
    evidence = json.dumps(f.get("evidence", {}), indent=1, ensure_ascii=False)
    parts.append(
        f"<details><summary>evidence</summary><pre>{html.escape(evidence)}</pre></details></section>"
    )
    return "".join(parts)


def render_html(report: dict) -> str:
    """One self-contained page (no external assets): findings ranked, each with its evidence."""
    m, b = report["model"], report["base"]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
        ".finding{border-left:6px solid #ccc;padding-left:1em;margin:1.5em 0}.high{border-color:#c0392b}"
        "code,pre{background:#f4f4f4}pre{white-space:pre-wrap;font-size:80%}"
    )
    findings = "".join(_finding(f) for f in report["findings"])
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>audit of {html.escape(m['name'])}</title>"
        f"<style>{style}</style></head><body><h1>Audit of {html.escape(m['name'])} against "
        f"{html.escape(b['name'])}</h1><p>model {m['fingerprint']}, base {b['fingerprint']}; dictionary at "
        f"{html.escape(', '.join(report['dictionary']['sites_in']))}; high confidence at "
        f"{report['high_confidence']}.</p>{findings}<p>time: {html.escape(timings)}</p></body></html>"
    )
