"""docs/cli.md is generated from the Typer app and must match the code."""

from __future__ import annotations

from fedtorrent.cli import docs


def test_cli_reference_is_current() -> None:
    committed = docs.PAGE.read_text(encoding="utf-8")
    assert committed == docs.render(), (
        f"docs/cli.md is stale: regenerate it with `{docs.COMMAND}` (or `make docs`)"
    )


def test_cli_reference_lists_every_visible_command_and_no_hidden_one() -> None:
    text = docs.render()
    for command in (
        "train",
        "simulate",
        "reproduce",
        "create",
        "tracker",
        "peer",
        "swarm",
        "server",
        "show",
        "partition",
        "ledger verify",
    ):
        assert f"## `fedtorrent {command}`" in text
    assert "`fedtorrent host`" not in text
    assert "* `--rounds <int>`" in text  # options with their help are listed
