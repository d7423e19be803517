"""The systemd units in conf/: hardened, parsed by systemd itself, exposure under 3.

The sandbox directives are checked by reading the files; where ``systemd-analyze`` is
installed, ``verify`` must accept the units without a warning and ``security --offline=yes``
must rate each service under 3.0 (it rated the old unit 8.7 EXPOSED).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import pytest_twisted

from tests.support.clients import run_process

CONF = Path(__file__).resolve().parents[2] / "conf"
SERVICES = ["streamer.service", "streamer-sync.service"]
UNITS = [*SERVICES, "streamer-sync.timer"]
INSTALL_BIN = "/opt/streamer/bin/"

#: What every service unit must say: its sandbox and its limits.
REQUIRED = {
    "User": "streamer",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/streamer",
    "StateDirectory": "streamer",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "LimitNOFILE": "65536",
}


def directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (comments and section headers skipped), every value kept."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("name", SERVICES)
def test_service_units_are_sandboxed_with_an_absolute_command(name):
    found = directives((CONF / name).read_text())
    for key, value in REQUIRED.items():
        assert value in found.get(key, []), (key, found.get(key))
    (command,) = found["ExecStart"]
    assert command.startswith(INSTALL_BIN), command
    assert "--config /etc/streamer/streamer.toml" in command


def test_streamer_unit_has_a_runtime_directory_for_its_socket():
    found = directives((CONF / "streamer.service").read_text())
    assert found["RuntimeDirectory"] == ["streamer"]
    assert "unix:/run/streamer/" in (CONF / "streamer.service").read_text()


def test_sync_timer_starts_the_sync_service():
    found = directives((CONF / "streamer-sync.timer").read_text())
    assert found["OnCalendar"] and found["Persistent"] == ["true"]
    sync = directives((CONF / "streamer-sync.service").read_text())
    assert sync["Type"] == ["oneshot"] and sync["ExecStart"][0].endswith(" sync")


def _installed_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart's folder replaced by stand-in executables under tmp_path
    (verify checks that the commands exist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("twistd", "streamer"):
        stub = bin_dir / program
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    copies = []
    for name in UNITS:
        copy = tmp_path / name
        copy.write_text((CONF / name).read_text().replace(INSTALL_BIN, f"{bin_dir}/"))
        copies.append(copy)
    return copies


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (package systemd)"
)


@needs_systemd_analyze
@pytest_twisted.ensureDeferred
async def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    copies = _installed_copies(tmp_path)
    result = await run_process("systemd-analyze", "verify", "--man=no", *map(str, copies))
    output = (result.stdout + result.stderr).decode()
    assert result.exit_code == 0, output
    # Unknown keys and bad values are only warnings ("..., ignoring"): none allowed.
    assert not re.search(r"unknown|ignoring|invalid|not executable", output, re.I), output


@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES)
@pytest_twisted.ensureDeferred
async def test_systemd_analyze_security_rates_the_services_under_3(tmp_path, name):
    copies = {copy.name: copy for copy in _installed_copies(tmp_path)}
    result = await run_process(
        "systemd-analyze", "security", "--offline=yes", "--no-pager", str(copies[name])
    )
    output = (result.stdout + result.stderr).decode()
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output
    assert float(match.group(1)) < 3.0, output
