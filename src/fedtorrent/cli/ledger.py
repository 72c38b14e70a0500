"""Commands: ``fedtorrent ledger verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtorrent.cli import app
from fedtorrent.errors import ConfigError

ledger_app = typer.Typer(
    help="Check the signed, hash-chained ledgers of updates that peers keep.",
    no_args_is_help=True,
)
app.add_typer(ledger_app, name="ledger")

EXIT_PROBLEMS = 1
"""Exit status when verification finds a problem (2 is any other fedtorrent error)."""


@ledger_app.command("verify")
def verify(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIRS", help="Run folders (searched for *.ledger.sqlite) or files."
        ),
    ],
    keys: Annotated[
        Path | None,
        typer.Option(help="JSON file mapping each peer to its Ed25519 public key (hex)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Fail on warnings too (undelivered or unchecked updates).")
    ] = False,
) -> None:
    """Check every chain and cross-check peers: tampering, missing entries, equivocation.

    Exits 0 when all is consistent, 1 when a problem is found.
    """
    from rich.console import Console  # noqa: PLC0415 (lazy: keep --help fast)
    from rich.table import Table  # noqa: PLC0415

    from fedtorrent.ledger import verify_ledgers  # noqa: PLC0415

    report = verify_ledgers(run_dirs, _read_keys(keys) if keys else None)
    console = Console()
    ledgers = Table(title="ledgers")
    for column in ("path", "owner", "entries", "chain"):
        ledgers.add_column(column)
    for summary in report.ledgers:
        chain = "[green]ok[/green]" if summary.chain_ok else "[red]broken[/red]"
        ledgers.add_row(summary.path, summary.owner[:16], str(summary.entries), chain)
    console.print(ledgers)
    findings = [*report.problems, *report.warnings]
    if findings:
        table = Table(title="findings")
        for column in ("kind", "owner", "seq", "round", "detail"):
            table.add_column(column)
        for finding in findings:
            style = "red" if finding in report.problems else "yellow"
            table.add_row(
                f"[{style}]{finding.kind}[/{style}]",
                finding.owner[:16],
                "" if finding.seq is None else str(finding.seq),
                "" if finding.round is None else str(finding.round),
                finding.detail,
            )
        console.print(table)
    failed = not report.ok or (strict and bool(report.warnings))
    verdict = "[red]FAILED[/red]" if failed else "[green]OK[/green]"
    console.print(
        f"{verdict}: {len(report.ledgers)} ledgers, {len(report.problems)} problems, "
        f"{len(report.warnings)} warnings"
    )
    if failed:
        raise typer.Exit(code=EXIT_PROBLEMS)


def _read_keys(path: Path) -> dict[str, str]:
    """Parse ``{"peer": "hex key", ...}``; anything else is a ConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read keys file {path}: {exc}") from exc
    if not (isinstance(data, dict) and all(isinstance(v, str) for v in data.values())):
        raise ConfigError(f"keys file {path} must map peer names to hex public keys")
    return data
