"""The hourly unit of work as plain functions any scheduler can drive.

Airflow tasks, ``mining run`` and the demo all call these, so the CLI and the DAG can
never drift apart. Each step reads the lake partitions of the steps before it and writes
its own; only ``load`` and ``publish`` open the warehouse (the single writer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from mining.lake import Interval, StepResult
from mining.settings import Settings, load_settings

log = logging.getLogger(__name__)

HOURLY_STEPS = ("scrape", "download", "embed", "score", "load", "publish")

# Per-run knobs an Airflow Param or CLI flag may override (everything else is deployment config).
RUN_KNOBS = ("dry_run", "publisher", "watermark_threshold", "phash_max_distance", "allow_nsfw",
             "min_width", "min_height", "watermark_on_all")


def settings_for_run(params: Mapping[str, Any] | None = None, secrets: Mapping[str, str] | None = None) -> Settings:
    """Deployment settings from the environment with a run's knobs applied (validated).

    ``secrets`` carries credentials resolved by the orchestrator (e.g. an Airflow
    Connection); they override env vars and are wrapped so they never print.
    """
    overrides: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key in RUN_KNOBS and value is not None and value != "":
            overrides[key] = value
    from mining.settings import Secret

    for key, value in (secrets or {}).items():
        if value:
            overrides[key] = Secret(value) if key.endswith("secret") else value
    return load_settings(**overrides)


def interval_for_run(start: datetime | None, end: datetime | None, run_after: datetime | None = None) -> Interval:
    """The interval a run owns; manual runs without a data interval own the hour before run_after."""
    if start is not None and end is not None and end > start:
        return Interval(start, end)
    if run_after is None:
        raise ValueError("a run needs a data interval or a run_after time")
    current = Interval.hour_of(run_after)
    return Interval(current.start - (current.end - current.start), current.start)


def scrape(settings: Settings, interval: Interval) -> StepResult:
    from mining.discovery import effective_watch_list
    from mining.listings import scrape_interval

    watch = effective_watch_list(settings)
    if watch != settings.watch_list:
        settings = settings.replace(watch_list=watch)
    return scrape_interval(settings, interval)


def download(settings: Settings, interval: Interval) -> StepResult:
    from mining.download import download_interval

    return download_interval(settings, interval)


def embed(settings: Settings, interval: Interval) -> StepResult:
    from mining.embed import embed_interval

    return embed_interval(settings, interval)


def score(settings: Settings, interval: Interval) -> StepResult:
    from mining.score import score_interval

    return score_interval(settings, interval)


def load(settings: Settings, interval: Interval) -> StepResult:
    from mining.warehouse import load_interval

    return load_interval(settings, interval)


def publish(settings: Settings, interval: Interval) -> StepResult:
    from mining.gallery import publish_interval

    return publish_interval(settings, interval)


def collect(settings: Settings, interval: Interval) -> StepResult:
    """The light collector: a few requests of r/all's /new into the current hour's partitions."""
    from mining.listings import collect as collect_listings

    return collect_listings(settings)


def iso_week(interval: Interval) -> str:
    """The ISO week (e.g. 2026-W47) a weekly interval reports on: the week its start falls in."""
    year, week, _ = interval.start.isocalendar()
    return f"{year}-W{week:02d}"


def _as_step(name: str, interval: Interval, result: Any) -> StepResult:
    if isinstance(result, StepResult):
        return result
    data = result.as_dict() if hasattr(result, "as_dict") else dict(getattr(result, "__dict__", {}))
    counts = {k: int(v) for k, v in data.items() if isinstance(v, int | bool)}
    path = data.get("path") or data.get("html_path")
    return StepResult(name, str(interval), str(path) if path else None, counts)


def report(settings: Settings, interval: Interval) -> StepResult:
    from mining.report import build_report

    return _as_step("report", interval, build_report(settings, iso_week(interval)))


def discover(settings: Settings, interval: Interval) -> StepResult:
    from mining.discovery import propose

    proposals = propose(settings, iso_week(interval))
    return StepResult("discover", str(interval), None, {"proposals": len(proposals)})


def refit(settings: Settings, interval: Interval) -> StepResult:
    from mining.refit import refit as refit_models

    return _as_step("refit", interval, refit_models(settings, iso_week(interval)))


STEP_FUNCTIONS: dict[str, Callable[[Settings, Interval], StepResult]] = {
    "scrape": scrape,
    "download": download,
    "embed": embed,
    "score": score,
    "load": load,
    "publish": publish,
    "collect": collect,
    "report": report,
    "discover": discover,
    "refit": refit,
}


def run_step(settings: Settings, interval: Interval, step: str, dag_id: str = "cli",
             run_id: str | None = None) -> StepResult:
    """Run one step and record its counts and duration in the warehouse ``runs`` table."""
    if step not in STEP_FUNCTIONS:
        raise ValueError(f"unknown step {step!r}; steps are {', '.join(STEP_FUNCTIONS)}")
    started = time.time()
    result = STEP_FUNCTIONS[step](settings, interval)
    elapsed = time.time() - started
    log.info("%s %s: %s (%.1f s)", step, interval, result.counts, elapsed)
    record_run(settings, dag_id, run_id or f"{dag_id}:{interval.key}", step, interval, started, result)
    return result


def run_interval(settings: Settings, interval: Interval, steps: Iterable[str] = HOURLY_STEPS,
                 dag_id: str = "cli") -> list[StepResult]:
    """Run the hourly steps in order for one interval (what ``mining run`` does)."""
    return [run_step(settings, interval, name, dag_id=dag_id) for name in steps]


def record_run(settings: Settings, dag_id: str, run_id: str, step: str, interval: Interval, started: float,
               result: StepResult, status: str = "success") -> None:
    """Append the step's counts and duration to the warehouse ``runs`` table (operability)."""
    from mining.warehouse import Warehouse

    with Warehouse.open(settings) as wh:
        wh.record_run(run_id=run_id, dag_id=dag_id, step=step, interval=interval, started_at=started,
                      finished_at=time.time(), status=status, counts=result.counts)
