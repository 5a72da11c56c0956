"""The kernel's verifier accepts the data plane built with the sizes lbctl attach can ask for.

The sizes are compile-time constants (bpf/consts.h): the smallest, the default and large
ones are each compiled, loaded and unpinned, in both builds (XDP, and TC: -DLB_HOOK_TC, with
the egress steering program). (The XDP mode is chosen at attach time, not
compiled in: tests/test_attach.py attaches in both.)"""
from __future__ import annotations

import os
import secrets

import pytest

from lb import loader
from lb.bpfsys import prog_id
from lb.pins import stable_bpffs

CONFIGS = {
    "smallest": loader.DataPlaneConfig(ring_size=2, max_vips=1, max_backends=2, conn_table_size=1,
                                       fullnat_table_size=1),
    "default": loader.DataPlaneConfig(),
    "large": loader.DataPlaneConfig(ring_size=131071, max_vips=1024, max_backends=65536, conn_table_size=1 << 21),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_verifier_accepts_program_built_with(name):
    pin_dir = os.path.join(stable_bpffs(), "lb", f"verifier-{secrets.token_hex(4)}")
    try:
        fd = loader.load_and_pin(CONFIGS[name], pin_dir)
        os.close(fd)
        assert os.path.exists(os.path.join(pin_dir, loader.PROGRAM_PIN))
    finally:
        loader.unpin_all(pin_dir)


def test_the_tc_hook_gets_the_tc_build_and_every_program_is_pinned():
    pin_dir = os.path.join(stable_bpffs(), "lb", f"verifier-{secrets.token_hex(4)}")
    try:
        fd = loader.load_and_pin(CONFIGS["default"], pin_dir, "tc")
        try:
            assert prog_id(fd) == _pinned_id(pin_dir, loader.TC_PROGRAM_PIN)
        finally:
            os.close(fd)
        for pin in (loader.PROGRAM_PIN, loader.EGRESS_PROGRAM_PIN):  # the probe's engine; health-check steering
            assert os.path.exists(os.path.join(pin_dir, pin))
    finally:
        loader.unpin_all(pin_dir)


def _pinned_id(pin_dir: str, pin: str) -> int:
    fd = loader.pinned_program(pin_dir, pin)
    try:
        return prog_id(fd)
    finally:
        os.close(fd)


def test_sizes_lbctl_refuses():
    with pytest.raises(ValueError, match="prime"):
        loader.DataPlaneConfig(ring_size=65536)
    with pytest.raises(ValueError, match="65,536 VIPs"):
        loader.DataPlaneConfig(max_vips=70000)


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_verifier_accepts_decap_program_for(hook):
    """Both entry points of bpf/decap.c (lbctl decap attach --hook xdp|tc). The data plane's own modes
    are map values, not compiled in: the fixtures load VIPs of every mode into one program."""
    from lb import decap

    pin_dir = os.path.join(stable_bpffs(), "lb-decap", f"verifier-{secrets.token_hex(4)}")
    try:
        fd = decap.load(pin_dir, hook)
        os.close(fd)
        assert os.path.exists(os.path.join(pin_dir, "decap_stats"))
    finally:
        loader.unpin_all(pin_dir)
