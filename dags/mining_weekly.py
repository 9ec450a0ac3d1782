"""mining_weekly: the source report, subreddit discovery and a refit of the taste model.

Reads the warehouse only. Runs every Monday 06:00 UTC for the ISO week that just ended;
backfill past weeks with `airflow backfill create --dag-id mining_weekly ...`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

WAREHOUSE = Asset("file:///mining/warehouse.duckdb")
REPORTS = Asset("file:///mining/reports")
NOVELTY = Asset("file:///mining/novelty")


def _run(step: str) -> dict:
    from mining_support import run_step

    return run_step(step)


@dag(
    dag_id="mining_weekly",
    schedule=CronDataIntervalTimetable("0 6 * * 1", timezone="UTC"),
    start_date=datetime(2026, 1, 5),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["mining"],
    doc_md=__doc__,
)
def mining_weekly() -> None:
    @task(pool="warehouse_writer", outlets=[REPORTS, WAREHOUSE])
    def report() -> dict:
        return _run("report")

    @task(pool="warehouse_writer", outlets=[WAREHOUSE])
    def discover() -> dict:
        return _run("discover")

    @task(pool="warehouse_writer", outlets=[NOVELTY, WAREHOUSE])
    def refit() -> dict:
        return _run("refit")

    discover() >> refit() >> report()


mining_weekly()
