"""mining_hourly: every hour, turn the hour's Reddit posts into published gallery images.

Configuration only: schedule, Params, wiring. Every task body calls mining.pipeline; heavy
imports happen inside tasks so the DAG parses in milliseconds. XCom carries paths and counts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

LAKE = {step: Asset(f"file:///mining/lake/{step}") for step in ("posts", "candidates", "embeddings", "scores")}
WAREHOUSE = Asset("file:///mining/warehouse.duckdb")
GALLERY = Asset("file:///mining/gallery")

RETRIES = {"retries": 3, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": True,
           "max_retry_delay": timedelta(minutes=20)}


def _run(step: str) -> dict:
    from mining_support import run_step

    return run_step(step)


@dag(
    dag_id="mining_hourly",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    default_args=RETRIES,
    tags=["mining"],
    params={
        "dry_run": Param(False, type="boolean", description="Score and record, but publish nothing"),
        "publisher": Param("folder", enum=["folder", "http", "none"], description="Where accepted images go"),
        "watermark_threshold": Param(None, type=["null", "number"], minimum=0, maximum=1,
                                     description="Override the detector's calibrated threshold"),
        "phash_max_distance": Param(None, type=["null", "integer"], minimum=0,
                                    description="Override the near-duplicate Hamming distance"),
    },
    doc_md=__doc__,
)
def mining_hourly() -> None:
    @task(pool="reddit_api", outlets=[LAKE["posts"]])
    def scrape() -> dict:
        return _run("scrape")

    @task(outlets=[LAKE["candidates"]])
    def download() -> dict:
        return _run("download")

    @task(queue="embed", outlets=[LAKE["embeddings"]])
    def embed() -> dict:
        return _run("embed")

    @task(outlets=[LAKE["scores"]])
    def score() -> dict:
        """Novelty, then watermark on survivors, then dedupe against the gallery."""
        return _run("score")

    @task(pool="warehouse_writer", outlets=[WAREHOUSE])
    def load() -> dict:
        return _run("load")

    @task(pool="warehouse_writer", outlets=[GALLERY, WAREHOUSE])
    def publish() -> dict:
        return _run("publish")

    scrape() >> download() >> embed() >> score() >> load() >> publish()


mining_hourly()
