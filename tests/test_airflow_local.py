"""`make airflow` (scripts/airflow-local.sh): Airflow standalone with mining's DAGs, pools and view.

Also keeps docs/operate.md's configuration table in step with mining.settings.Settings.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request
from pathlib import Path

import pytest
from replay_world import airflow_local

from mining.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OPERATE = ROOT / "docs" / "operate.md"


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read().decode()


@pytest.mark.slow
def test_make_airflow_lists_the_dags_and_serves_the_mining_view(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with airflow_local(tmp_path, home) as base:
        status, body = _get(f"{base}/api/v2/dags")
        dag_ids = {d["dag_id"] for d in json.loads(body)["dags"]}
        assert {"mining_hourly", "mining_collector", "mining_weekly"} <= dag_ids
        status, body = _get(f"{base}/api/v2/pools")
        pools = {p["name"]: p["slots"] for p in json.loads(body)["pools"]}
        assert pools["reddit_api"] == 1 and pools["warehouse_writer"] == 1
        status, body = _get(f"{base}/api/v2/connections/reddit_default")
        assert json.loads(body)["conn_type"] == "generic"
        status, body = _get(f"{base}/api/v2/plugins")
        views = [v for p in json.loads(body)["plugins"] for v in p["external_views"]]
        assert {"name": "Mining", "href": "/mining/", "url_route": "mining"}.items() <= views[0].items()
        status, page = _get(f"{base}/mining/")
        assert status == 200 and "No warehouse yet" in page
    log = (tmp_path / "airflow-local.log").read_text()
    assert f"Airflow UI  : {base}" in log and "no login needed" in log


def _documented() -> set[str]:
    return set(re.findall(r"^\| `(MINING_[A-Z0-9_]+)`", OPERATE.read_text(), re.M))


def test_operate_doc_documents_every_setting() -> None:
    fields = {"MINING_" + f.name.upper(): f for f in dataclasses.fields(Settings)}
    documented = _documented()
    missing = sorted(set(fields) - documented)
    assert not missing, "docs/operate.md's configuration table lacks (add a row each):\n" + "\n".join(
        f"| `{name}` | `{fields[name].default!r}` | ... |" for name in missing)
    assert not documented - set(fields), f"documented but not settings: {sorted(documented - set(fields))}"
