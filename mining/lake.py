"""The lake: one Parquet file per (step, interval), replaced atomically.

The lake is the record; the warehouse is an index rebuilt from it. Each step owns the
partition of the interval it runs for, so a rerun or a backfill overwrites exactly that
partition (write a temp file, fsync, rename) and never duplicates rows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STEPS = ("posts", "coverage", "candidates", "embeddings", "scores")


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open UTC time range [start, end) that one run owns."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None:
                raise ValueError(f"interval {name} must be timezone-aware: {value!r}")
            # Normalise to a plain stdlib datetime in UTC (Airflow hands over pendulum objects).
            object.__setattr__(self, name, datetime.fromtimestamp(value.timestamp(), UTC))
        if self.end <= self.start:
            raise ValueError(f"interval end {self.end.isoformat()} is not after start {self.start.isoformat()}")

    @classmethod
    def parse(cls, start: str, end: str | None = None) -> Interval:
        """Parse ISO timestamps (naive means UTC); end defaults to start + 1 hour."""
        s = _parse_ts(start)
        e = _parse_ts(end) if end else s + timedelta(hours=1)
        return cls(s, e)

    @classmethod
    def hour_of(cls, moment: datetime) -> Interval:
        """The hourly interval that contains ``moment``."""
        moment = moment.astimezone(UTC)
        start = moment.replace(minute=0, second=0, microsecond=0)
        return cls(start, start + timedelta(hours=1))

    def hours(self) -> list[Interval]:
        """Split into whole hours (the lake's partition unit)."""
        out, cur = [], self.start
        while cur < self.end:
            nxt = min(cur + timedelta(hours=1), self.end)
            out.append(Interval(cur, nxt))
            cur = nxt
        return out

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment.astimezone(UTC) < self.end

    @property
    def key(self) -> str:
        """Partition name, sortable and filesystem-safe."""
        return self.start.strftime("%Y-%m-%dT%H-%M-%SZ")

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


def _parse_ts(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StepResult:
    """What a step returns to its caller (XCom carries this: paths and counts, never data)."""

    step: str
    interval: str
    path: str | None
    counts: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {"step": self.step, "interval": self.interval, "path": self.path, "counts": dict(self.counts)}


def partition_dir(lake: Path, step: str, interval: Interval) -> Path:
    return lake / step / f"interval={interval.key}"


def partition_path(lake: Path, step: str, interval: Interval) -> Path:
    return partition_dir(lake, step, interval) / "part.parquet"


def write_partition(lake: Path, step: str, interval: Interval, table: pa.Table) -> Path:
    """Atomically replace the (step, interval) partition with ``table``."""
    path = partition_path(lake, step, interval)
    atomic_write_table(table, path)
    return path


def read_partition(lake: Path, step: str, interval: Interval, schema: pa.Schema | None = None) -> pa.Table | None:
    """The partition's table, or None when the step has not run for this interval."""
    path = partition_path(lake, step, interval)
    if not path.exists():
        return None
    table = pq.read_table(path)
    return table.cast(schema) if schema is not None and table.schema != schema else table


def read_partitions(lake: Path, step: str, interval: Interval, schema: pa.Schema | None = None) -> pa.Table | None:
    """Concatenate the hourly partitions an interval spans (None when none exists)."""
    parts = [t for h in interval.hours() if (t := read_partition(lake, step, h, schema)) is not None]
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="default")


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write Parquet to a temp file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write bytes via temp file + rename so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file: the content address used everywhere (images, models, photos)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)
