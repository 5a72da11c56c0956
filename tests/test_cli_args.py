"""lbctl's command line as people type it (no root, no lab): global options before or after the command."""
from __future__ import annotations

import pytest

from control.cli import build_parser, parse_args


@pytest.mark.parametrize("argv", [
    ["--state", "/tmp/a.db", "daemon"],
    ["daemon", "--state", "/tmp/a.db"],
    ["daemon", "--config", "lb.yaml", "--state", "/tmp/a.db"],
    ["--state", "/tmp/a.db", "list", "--json"],
    ["list", "--state", "/tmp/a.db", "--json"],
    ["acl", "add", "10.0.0.1:80/tcp", "10.1.0.0/16", "--deny", "--state", "/tmp/a.db"],
    ["decap", "stats", "--state", "/tmp/a.db"],
    ["add-vip", "--state=/tmp/a.db", "10.0.0.1:80/tcp"],
])
def test_state_is_taken_before_and_after_the_command(argv):
    assert build_parser().parse_args(argv).state == "/tmp/a.db"


@pytest.mark.parametrize("argv", [
    ["--api-socket", "/run/x.sock", "status"],
    ["status", "--api-socket", "/run/x.sock"],
    ["--state", "/tmp/a.db", "test-packet", "00", "--api-socket", "/run/x.sock"],
])
def test_api_socket_is_taken_before_and_after_the_command(argv):
    assert build_parser().parse_args(argv).api_socket == "/run/x.sock"


def test_an_option_given_before_the_command_is_not_reset_by_the_commands_parser(monkeypatch):
    monkeypatch.setenv("LBCTL_STATE", "/env.db")
    args = build_parser().parse_args(["--state", "/before.db", "daemon"])
    assert args.state == "/before.db" and args.api_socket is None


def test_defaults_come_from_the_environment_and_after_wins_over_before(monkeypatch):
    monkeypatch.setenv("LBCTL_STATE", "/env.db")
    monkeypatch.setenv("LBCTL_API_SOCKET", "/env.sock")
    assert parse_args(["list"]).state == "/env.db"
    assert build_parser().parse_args(["daemon"]).api_socket == "/env.sock"
    assert build_parser().parse_args(["--state", "/before.db", "list", "--state", "/after.db"]).state == "/after.db"


def test_every_command_lists_the_global_options_in_its_help():
    parser = build_parser()
    for argv in (["daemon"], ["acl", "add"], ["decap", "attach"]):
        action = next(a for a in parser._actions if a.dest == "command")
        sub = action.choices[argv[0]]
        if len(argv) > 1:
            sub = next(a for a in sub._actions if a.dest.endswith("_command")).choices[argv[1]]
        assert "--state" in sub.format_help() and "--api-socket" in sub.format_help()


@pytest.mark.parametrize("argv", [
    ["--store", "etcd://127.0.0.1:2379/lb", "list"],
    ["list", "--store", "etcd://127.0.0.1:2379/lb"],
])
def test_store_is_taken_before_and_after_the_command(argv, monkeypatch):
    monkeypatch.setenv("LBCTL_STATE", "/env.db")  # --store wins over the environment's state file
    assert parse_args(argv).state == "etcd://127.0.0.1:2379/lb"
