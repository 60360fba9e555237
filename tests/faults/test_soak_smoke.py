"""The soak benchmark in small (issue 14, point 3): `scripts/bench soak` for 20 s
with a change every second, against the real kernel and the real agent.

The full soak runs for minutes and is not a test; this checks that it runs,
reports every figure the README quotes, and that under this short load and
churn nothing is left behind: no open-connection count, no socket or
reverse-NAT entry, no backend id beyond the final config, and the stable
services' clients saw no error.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import PY, REPO

pytestmark = pytest.mark.root

LEAKS = ("active_sum", "open_connections_sum", "socket_entries", "reverse_nat_entries", "reverse_socket_records",
         "backend_ids_beyond_config")


@pytest.mark.timeout(240)
def test_a_short_soak_reports_its_figures_and_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([PY, "-m", "equilibriumd.lab.bench.soak", "--seconds", "20", "--churn-every", "1",
                        "--sample-every", "2", "--rate", "60", "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    res = json.loads(out.read_text())
    for k in ("warmup_mb", "end_mb", "max_mb", "growth_mb_per_minute"):
        assert isinstance(res["rss"][k], float), res["rss"]
    assert 10 < res["rss"]["end_mb"] < 200
    assert len(res["samples"]) >= 8 and all("maps" in s and "rss_bytes" in s for s in res["samples"])
    assert {"eq_tel_sock", "eq_lb4_rev", "eq_lb4_fe", "eq_tel_caller"} <= set(res["maps_end"])
    assert res["maps_max"]["eq_tel_sock"] > 0   # the load was there: sockets were tracked
    assert sum(res["changes"].values()) >= 10 and res["changes"].get("add_service", 0) > 0
    for kind in ("web-new", "pool-pooled", "dns-udp"):   # the stable services: never an error
        c = res["clients"][kind]
        assert c["ok"] > 100 and c["errors"] == {} and c["ok"] == c["sent"], (kind, c)
    assert res["agent_log"]["tick_failed"] == 0 and res["agent_log"]["config_refused"] == 0
    assert {k: res["leaks"][k] for k in LEAKS} == dict.fromkeys(LEAKS, 0), res["leaks"]
    assert res["leaked_total"] == 0
