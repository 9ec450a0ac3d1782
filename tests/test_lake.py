from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from mining.lake import Interval, read_partition, read_partitions, write_partition


def test_interval_parsing_and_hours() -> None:
    iv = Interval.parse("2026-11-23T10:00:00", "2026-11-23T13:00:00Z")
    assert iv.start == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert [h.key for h in iv.hours()] == ["2026-11-23T10-00-00Z", "2026-11-23T11-00-00Z", "2026-11-23T12-00-00Z"]
    assert Interval.parse("2026-11-23T10:00:00+02:00").start.hour == 8
    with pytest.raises(ValueError, match="not after"):
        Interval.parse("2026-11-23T10:00:00", "2026-11-23T09:00:00")


def test_partition_rewrite_replaces_never_appends(tmp_path: Path) -> None:
    iv = Interval.parse("2026-11-23T10:00:00")
    write_partition(tmp_path, "posts", iv, pa.table({"a": [1, 2]}))
    write_partition(tmp_path, "posts", iv, pa.table({"a": [3]}))
    assert read_partition(tmp_path, "posts", iv).column("a").to_pylist() == [3]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    wide = Interval.parse("2026-11-23T09:00:00", "2026-11-23T12:00:00")
    assert read_partitions(tmp_path, "posts", wide).num_rows == 1
    assert read_partition(tmp_path, "posts", Interval.parse("2026-11-23T11:00:00")) is None
