"""What a one-shot lbctl imports: a changing command (add-backend, say) needs neither pyroute2
(150 ms to import; lb/rtnl.py reads the kernel's tables) nor the daemon's HTTP server, the YAML
parser, the connection reader or the probe. Each is imported by the commands that use it."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyroute2", "yaml", "http.server", "http.client", "control.config", "control.connections", "lb.probe",
         "lb.refmodel", "lb.offload", "scapy")


def test_a_changing_command_imports_none_of_the_heavy_modules():
    code = ("import sys; from control import cli, commands, service, apiclient, recovery, reconcile, routes; "
            "print(','.join(sorted(m for m in sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60).stdout.strip().split(","))
    assert "control.service" in loaded and "lb.rtnl" in loaded
    assert not [m for m in HEAVY if m in loaded]
