"""deploy/: the systemd units pass systemd-analyze verify, their stop timeouts match the
grace periods, the environment file is valid settings, and the Grafana dashboard uses
only metrics the processes export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import worker  # noqa: F401 - and the broker's
from config import Settings
from tests.support import ROOT, finish, spawn_argv

DEPLOY = ROOT / "deploy"
UNITS = ("mailroom-server.service", "mailroom-worker@.service")


def unit_setting(unit: str, key: str) -> str:
    found = re.search(rf"^{key}=(.*)$", (DEPLOY / unit).read_text(), re.MULTILINE)
    assert found, f"{unit} has no {key}="
    return found.group(1).strip()


async def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    # The units name /opt/mailroom; verify checks that ExecStart's program exists, so
    # point them at this checkout (whose .venv the test runs in).
    for unit in UNITS:
        text = (DEPLOY / unit).read_text().replace("/opt/mailroom", str(ROOT))
        (tmp_path / unit).write_text(text)
    proc = await spawn_argv(
        [analyze, "verify", *(str(tmp_path / u) for u in UNITS)],
        tmp_path,
        {"PATH": "/usr/bin:/bin"},
    )
    code, out = await finish(proc, timeout=60)
    assert code == 0, out
    assert out.strip() == "", out  # no warning either (an unknown key is only a warning)


def test_stop_timeouts_match_the_grace_periods() -> None:
    settings = Settings.from_env({}, env_file=DEPLOY / "mailroom.env")
    worker_stop = float(unit_setting("mailroom-worker@.service", "TimeoutStopSec"))
    assert worker_stop == settings.shutdown_grace + 15
    server_stop = float(unit_setting("mailroom-server.service", "TimeoutStopSec"))
    assert server_stop >= max(10.0, settings.publish_timeout + 5) + 10
    for unit in UNITS:
        assert unit_setting(unit, "NoNewPrivileges") == "yes"
        assert unit_setting(unit, "ProtectSystem") == "strict"
        assert unit_setting(unit, "DynamicUser") == "yes"
        assert unit_setting(unit, "Restart") == "on-failure"
        assert unit_setting(unit, "EnvironmentFile") == "/etc/mailroom/mailroom.env"
    assert unit_setting("mailroom-worker@.service", "Environment") == "WORKER_METRICS_PORT=%i"


def test_environment_file_is_valid_settings() -> None:
    settings = Settings.from_env({}, env_file=DEPLOY / "mailroom.env")
    assert len(settings.amqp_urls) == 3
    assert settings.queue_type == "quorum"
    assert settings.database_url.get().startswith("postgresql://")
    assert "CHANGE-ME" not in repr(settings)


def test_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"mailroom_[a-z_]+", expr)}
    exported = {s.name for family in REGISTRY.collect() for s in family.samples}
    exported |= {"mailroom_queue_messages"}  # computed at scrape time (metrics.QueueDepths)
    assert used and used <= exported, used - exported
