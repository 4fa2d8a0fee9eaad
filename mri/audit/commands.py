"""`mri audit`: scan a model against its base and write the report; `mri audit ledger` shows how often a
model's signals were read. `mri audit MODEL ...` is short for `mri audit scan MODEL ...`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

from mri.errors import MriError

console = Console(stderr=True)


class _DefaultScan(TyperGroup):
    """A group whose first argument, when it names no subcommand, starts `scan`."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["scan", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_DefaultScan,
    help="Audit a model against its base: findings with evidence, causal checks and confidence. "
    "`mri audit MODEL ...` is short for `mri audit scan MODEL ...`.",
    no_args_is_help=True,
)


@audit_app.command("scan")
def scan(
    model: str = typer.Argument(..., help="Model to audit: folder, shipped organism or hub name."),
    base: str = typer.Option(..., "--base", help="The model it was fine-tuned from."),
    dictionary: Path | None = typer.Option(None, "--dict", help="A dictionary trained on the base."),
    out: Path = typer.Option(Path("audit"), "--out", help="Folder for report.json, report.html, manifest."),
    train_dict: bool = typer.Option(
        False, "--train-dict", help="With no --dict: train a small SAE on the base first (into OUT.dict)."
    ),
    prompts: int = typer.Option(32, "--prompts", help="Standard prompts the models continue."),
    candidates: int = typer.Option(
        24, "--candidates", help="Weight-diff candidate tokens for trigger search."
    ),
    max_triggers: int = typer.Option(
        2,
        "--max-triggers",
        help="Trigger searches at most: each trigger confirmed starts another search that discounts the "
        "behaviours found, for a model holding more than one backdoor (1: search once).",
    ),
    wide_pool: int = typer.Option(
        1024,
        "--wide-pool",
        help="When nothing the trigger search named is confirmed, grow its token string "
        "at both ends over this many weight-diff candidates and confirm again (0: skip).",
    ),
    probes: bool = typer.Option(True, "--probes/--no-probes", help="Train and run the truth probe."),
    lexicon: str | None = typer.Option(
        None,
        "--lexicon",
        help="Word list the trigger search spells phrases from (`mri zoo lexicon`; "
        "default: the shipped zoo lexicon; 'none' skips that stage).",
    ),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file (default $MRI_CACHE/audit)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Scan MODEL against BASE and write the report."""
    import mri
    from mri.audit.diffing import check_pair
    from mri.audit.ledger import default_ledger
    from mri.audit.scan import AuditConfig, audit, train_base_dictionary
    from mri.dictionaries import load as load_dictionary

    if max_triggers < 1:
        raise MriError(f"--max-triggers must be 1 or more (1 searches once), not {max_triggers}")
    if wide_pool < 0:
        raise MriError(f"--wide-pool must be 0 (skip) or a number of candidate tokens, not {wide_pool}")
    m, b = mri.load(model), mri.load(base)
    check_pair(m, b)
    if dictionary is None and not train_dict:
        raise MriError(
            f"the audit reads features through a dictionary trained on the base; give --dict DIR, train one with "
            f"`mri dict train --model {base} --site L{b.n_layers // 2}.resid_post --out DICT`, or pass "
            "--train-dict to train a small one now"
        )
    if dictionary is None:
        dictionary = out.with_name(out.name + ".dict")
        console.print(f"training a small dictionary on {b.name} into {dictionary}")
        d = train_base_dictionary(b, dictionary)
    else:
        d = load_dictionary(dictionary)
    if lexicon not in (None, "none"):
        from mri.zoo.lexicon import load_lexicon

        load_lexicon(lexicon, limit=1)  # a bad path fails here, before the models run
    cfg = AuditConfig(prompts=prompts, candidates=candidates, wide_pool=wide_pool, max_triggers=max_triggers,
                      probes=probes, lexicon=lexicon, seed=seed)  # fmt: skip
    report = audit(m, b, d, out, cfg, ledger=ledger, inputs={"dictionary": str(Path(dictionary).resolve())},
                   log=console.print)  # fmt: skip
    for f in report["findings"]:
        mark = "HIGH" if f["high_confidence"] else "low "
        print(f"#{f['rank']} [{mark} {f['confidence']:.2f}] {f['kind']}: {f['title']}")
    print(f"report: {out / 'report.html'}; ledger: {ledger or default_ledger()}")


@audit_app.command("ledger")
def ledger_cmd(
    model: str = typer.Argument(..., help="Model name (as recorded), folder or shipped organism."),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file (default $MRI_CACHE/audit)."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
) -> None:
    """How often MODEL was audited and how often each of its signals was read."""
    from mri.audit.ledger import consulted, read

    fingerprint = None
    if Path(model).exists() or model.startswith("mri-"):
        import mri

        fingerprint = mri.load(model).fingerprint()
    seen = consulted(model, fingerprint, ledger)
    if as_json:
        print(json.dumps(seen, indent=1))
        return
    total = len(read(ledger))
    print(f"{model}: audited {seen['audits']} time(s) of {total} in the ledger")
    for signal, n in sorted(seen["signals"].items()):
        print(f"  {signal}: read {n} time(s)")
    for e in seen["entries"][-5:]:
        print(
            f"  {e['time']}  base {e.get('base')}  {e.get('high_confidence', 0)} high-confidence  {e.get('out')}"
        )
