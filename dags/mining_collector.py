"""mining_collector: a light, frequent fetch of high-volume listings (r/all).

r/all outruns an hourly fetch, so this samples /new every few minutes into the same hourly
lake partitions that mining_hourly processes; gaps it cannot close are recorded as data.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.timetables.trigger import CronTriggerTimetable


@dag(
    dag_id="mining_collector",
    schedule=CronTriggerTimetable("*/5 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    tags=["mining"],
    doc_md=__doc__,
)
def mining_collector() -> None:
    @task(pool="reddit_api", execution_timeout=timedelta(minutes=4))
    def collect() -> dict:
        from mining_support import run_step

        return run_step("collect")

    collect()


mining_collector()
