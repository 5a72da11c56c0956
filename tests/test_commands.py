"""control.commands.dispatch on what the daemon's API may receive: any JSON value."""
from __future__ import annotations

import pytest

from control.commands import dispatch
from control.errors import InputError


class NoController:
    """Bad parameters must be refused before the Controller is reached."""

    def __getattr__(self, name: str):
        def called(*args):
            raise AssertionError(f"the Controller was called: {name}{args}")
        return called


@pytest.mark.parametrize("command, params, words", [
    ("add-backend", {"vip": "198.19.0.1:80/tcp", "backend": "198.18.1.2", "weight": "2"},
     "'weight' must be a whole number, got \"2\""),
    ("add-backend", {"vip": "198.19.0.1:80/tcp", "backend": "198.18.1.2", "weight": True}, "'weight' must be"),
    ("add-vip", {"vip": 5}, "'vip' must be a string, got 5"),
    ("set-weight", {"vip": "198.19.0.1:80/tcp", "backend": "198.18.1.2", "weight": 1.5}, "whole number"),
    ("set-weight", {"vip": "198.19.0.1:80/tcp", "backend": "198.18.1.2"}, "missing parameter 'weight'"),
    ("attach", {"interfaces": "eth0"}, "'interfaces' must be a list of strings"),
    ("attach", {"interfaces": ["eth0"], "ring_size": "65537"}, "'ring_size' must be a whole number"),
    ("apply", {"text": "vips: []", "dry_run": "no"}, "'dry_run' must be true or false"),
    ("test-packet", {"frame_hex": 1234}, "'frame_hex' must be a string"),
    ("test-packet", {"frame_hex": "zz"}, "not valid hex"),
    ("acl", {"acl_command": "list"}, "unknown acl command 'list' (expected one of: add, remove)"),
    ("acl", {}, "missing parameter 'acl_command'"),
    ("frobnicate", {}, "unknown command 'frobnicate'"),
])
def test_bad_parameters_are_bad_input_not_internal_errors(command, params, words):
    with pytest.raises(InputError) as e:
        dispatch(NoController(), command, params)
    assert words in str(e.value)
