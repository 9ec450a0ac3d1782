"""Glue between Airflow's task context and mining's plain step functions.

Kept out of the DAG files so each of them reads like configuration; listed in
.airflowignore because it defines no DAG.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

REDDIT_CONN_ID = "reddit_default"
GALLERY_CONN_ID = "mining_gallery"


def _connection_secrets() -> dict[str, str]:
    """Credentials from Airflow Connections; absent connections fall back to env vars."""
    from airflow.sdk import Connection

    secrets: dict[str, str] = {}
    for conn_id, mapping in ((REDDIT_CONN_ID, {"login": "reddit_client_id", "password": "reddit_client_secret"}),
                             (GALLERY_CONN_ID, {"host": "publish_url", "password": "publish_secret"})):
        try:
            conn = Connection.get(conn_id)
        except Exception:  # not configured: env vars (or anonymous access) apply
            continue
        for attr, key in mapping.items():
            value = getattr(conn, attr, None)
            if value:
                secrets[key] = value
    return secrets


def run_step(step: str) -> dict[str, Any]:
    """Run one mining step for the current task's data interval; return paths and counts for XCom."""
    from airflow.sdk import get_current_context

    from mining.pipeline import interval_for_run, settings_for_run
    from mining.pipeline import run_step as run_mining_step

    ctx = get_current_context()
    settings = settings_for_run(ctx["params"], _connection_secrets())
    dag_run = ctx["dag_run"]
    interval = interval_for_run(ctx.get("data_interval_start"), ctx.get("data_interval_end"),
                                getattr(dag_run, "run_after", None) or ctx.get("logical_date"))
    log.info("mining %s for %s", step, interval)
    return run_mining_step(settings, interval, step, dag_id=ctx["dag"].dag_id, run_id=dag_run.run_id).as_dict()
