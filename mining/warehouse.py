"""The DuckDB warehouse: schema migrations, the per-interval loader, the single-writer lock.

The lake is the record; the warehouse is an index loaded from it plus the small state that
must change transactionally (gallery, publications, model versions, runs, watch list).
DuckDB lets one process open the file at a time (even a read-only opener is refused while
a writer holds it), so every opener first takes ``warehouse.duckdb.lock`` with ``flock``:
writers exclusively, readers shared. Two CLI processes or two Airflow tasks then wait for
each other instead of failing with "Could not set lock".

All timestamps are UTC, stored as naive ``TIMESTAMP`` so any client can read them without
a time-zone library.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mining import clock
from mining.lake import Interval, StepResult, atomic_write_table, partition_dir, partition_path, read_partition
from mining.schemas import SCORES
from mining.settings import Settings

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).with_name("sql")
LOCK_POLL_S = 0.05

# Lake columns copied into each table (raw_json stays in the lake: it is most of the bytes).
POST_COLUMNS = ("post_id", "subreddit", "source", "title", "author", "permalink", "url", "domain", "created_utc",
                "over_18", "is_self", "is_video", "is_gallery", "is_crosspost", "removed_by_category", "score",
                "num_comments", "fetched_at")
COVERAGE_COLUMNS = ("source", "fetched_at", "collector", "pages", "requests", "posts_seen", "posts_kept",
                    "oldest_seen", "newest_seen", "reached_boundary", "gap", "error")
CANDIDATE_COLUMNS = ("candidate_id", "post_id", "subreddit", "position", "kind", "url", "known_width",
                     "known_height", "status", "sha256", "path", "format", "width", "height", "bytes",
                     "http_status", "elapsed_s")
EMBEDDING_COLUMNS = ("sha256", "model", "dim", "embedding")
SCORE_COLUMNS = tuple(name for name in SCORES.names if name != "interval_start")
TIMESTAMP_COLUMNS = {"created_utc", "fetched_at", "oldest_seen", "newest_seen", "scored_at"}

# Lake tables in load order, with the key that makes rows unique inside one partition.
LAKE_TABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "posts": (POST_COLUMNS, "post_id", "fetched_at DESC NULLS LAST"),
    "coverage": (COVERAGE_COLUMNS, "", ""),
    "candidates": (CANDIDATE_COLUMNS, "candidate_id", "candidate_id"),
    "embeddings": (EMBEDDING_COLUMNS, "sha256, model", "sha256"),
}
TABLES = ("posts", "coverage", "candidates", "embeddings", "scores", "images", "gallery", "publications",
          "model_versions", "runs", "watch_list")
VIEWS = ("decisions", "candidate_decisions", "published", "mined_images", "acceptance_by_subreddit",
         "latest_scores", "active_scores", "score_distribution", "rescore_changes", "hourly_decisions",
         "active_models")
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN", "PRAGMA")


class WarehouseLockTimeout(RuntimeError):
    """Another process held the warehouse longer than the configured wait."""


class ReadOnlyQueryError(ValueError):
    """``mining sql`` was given something other than a read-only query."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The packaged ``NNN_name.sql`` files, in version order."""
    out = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if not match:
            raise RuntimeError(f"badly named migration {path.name}: expected NNN_name.sql")
        out.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {SQL_DIR}: {versions}")
    return out


def utc(value: datetime | float | int | str | None) -> datetime | None:
    """Any timestamp (aware datetime, epoch seconds, ISO text) as the naive UTC the warehouse stores."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def _now() -> datetime:
    return utc(clock.now())  # type: ignore[return-value]


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# ---------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------
class _FileLock:
    """flock on ``<warehouse>.lock``: exclusive for writers, shared for readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, exclusive: bool, timeout_s: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = clock.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if clock.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise WarehouseLockTimeout(
                        f"warehouse is busy: waited {timeout_s:.0f} s for the "
                        f"{'exclusive' if exclusive else 'shared'} lock {self.path}{holder}; another load/publish/"
                        f"refit (or `mining sql`) is running. Raise MINING_WAREHOUSE_LOCK_TIMEOUT_S to wait longer."
                    ) from None
                clock.sleep(LOCK_POLL_S)
        if exclusive:  # say who holds it, for the next waiter's error message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        return f" (last writer: {text})" if text else ""

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


_held = threading.local()  # path -> Warehouse this thread already has open (re-entrant opens)


# ---------------------------------------------------------------------------------------
# the warehouse
# ---------------------------------------------------------------------------------------
class Warehouse:
    """An open warehouse connection; get one with ``Warehouse.open(settings)``."""

    def __init__(self, con: duckdb.DuckDBPyConnection, settings: Settings, read_only: bool) -> None:
        self.con = con
        self.settings = settings
        self.read_only = read_only
        self._tx_depth = 0

    # -- opening -------------------------------------------------------------------------
    @classmethod
    @contextmanager
    def open(cls, settings: Settings, read_only: bool = False, timeout_s: float | None = None) -> Iterator[Warehouse]:
        """Open under the lock (exclusive for writers, shared for readers); migrate when writing.

        Re-entrant within a thread: a nested open reuses the connection already held (a
        writer serves nested readers; a reader cannot be upgraded to a writer).
        """
        path = settings.warehouse_path
        key = str(path.resolve())
        held: dict[str, Warehouse] = _held.__dict__.setdefault("map", {})
        if key in held:
            outer = held[key]
            if outer.read_only and not read_only:
                raise RuntimeError("cannot open the warehouse for writing inside a read-only open")
            yield outer
            return
        if timeout_s is None:
            timeout_s = settings.warehouse_read_timeout_s if read_only else settings.warehouse_lock_timeout_s
        lock = _FileLock(path.with_name(path.name + ".lock"))
        for attempt in range(3):
            lock.acquire(exclusive=not read_only, timeout_s=timeout_s)
            try:
                con = _connect(path, read_only, timeout_s) if not read_only or path.exists() else None
            except BaseException:
                lock.release()
                raise
            if read_only and (con is None or not _is_current(con)) and attempt < 2:
                # A fresh home, or code newer than the file: create/migrate it once as a writer.
                if con is not None:
                    con.close()
                lock.release()
                with cls.open(settings, read_only=False, timeout_s=timeout_s):
                    pass
                continue
            break
        assert con is not None
        try:
            wh = cls(con, settings, read_only)
            if not read_only:
                wh.migrate()
            held[key] = wh
            try:
                yield wh
            finally:
                held.pop(key, None)
        finally:
            try:
                con.close()
            finally:
                lock.release()

    # -- migrations ----------------------------------------------------------------------
    def applied_migrations(self) -> list[int]:
        exists = _first(self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'").fetchall())
        if not exists or not exists[0]:
            return []
        return [r[0] for r in self.con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()]

    def migrate(self) -> list[int]:
        """Apply pending migrations in order, each in its own transaction; returns those applied."""
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
        done = set(self.applied_migrations())
        applied = []
        for m in migrations():
            if m.version in done:
                continue
            with self.transaction():
                self.con.execute(m.sql)
                if m.version == 1:
                    self._seed_watch_list()
                self.con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [m.version, m.name, _now()])
            log.info("warehouse: applied migration %03d_%s", m.version, m.name)
            applied.append(m.version)
        return applied

    def _seed_watch_list(self) -> None:
        now = _now()
        seen: set[str] = set()
        for name in self.settings.watch_list:
            core = name.removeprefix("r/")
            if core.lower() in seen:
                continue
            seen.add(core.lower())
            self.con.execute("INSERT INTO watch_list VALUES (?, ?, 'user', true, 'seeded from settings')",
                             [core, now])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN/COMMIT (ROLLBACK on error); nested uses join the outer transaction."""
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield
            finally:
                self._tx_depth -= 1
            return
        self.con.execute("BEGIN TRANSACTION")
        self._tx_depth = 1
        try:
            yield
        except BaseException:
            self._tx_depth = 0
            self.con.execute("ROLLBACK")
            raise
        self._tx_depth = 0
        self.con.execute("COMMIT")

    # -- generic queries ---------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run one statement; (column names, rows). Goes through Arrow so TIMESTAMPTZ needs no pytz."""
        rel = self.con.sql(sql, params=params) if params is not None else self.con.sql(sql)
        if rel is None:
            return [], []
        table = rel.to_arrow_table()
        data = [table.column(i).to_pylist() for i in range(table.num_columns)]
        rows = list(zip(*data, strict=True)) if data else []
        return list(table.column_names), rows

    def rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Like :meth:`query`, as dicts."""
        columns, rows = self.query(sql, params)
        return [dict(zip(columns, r, strict=True)) for r in rows]

    def table_rows(self, table: str) -> list[tuple]:
        """Every row of a table in a total order (what idempotence tests compare)."""
        if table not in TABLES and table != "schema_migrations":
            raise ValueError(f"unknown table {table!r}")
        return self.query(f"SELECT * FROM {table} ORDER BY ALL")[1]

    # -- loading from the lake ---------------------------------------------------------
    def load(self, interval: Interval) -> StepResult:
        """Replace the interval's lake-derived rows with the lake's partitions, in ONE transaction.

        Each table is replaced with one DELETE and one INSERT over all the interval's partition
        files (DuckDB reads the Parquet directly), so a day loads in a handful of statements.
        """
        self._require_writer()
        lake = self.settings.lake_dir
        hours = interval.hours()
        counts: Counter[str] = Counter()
        loaded_hours: set[datetime] = set()
        with self.transaction():
            for table, (columns, key, order) in LAKE_TABLES.items():
                parts = [(partition_path(lake, table, h), utc(h.start)) for h in hours]
                present = [(p, t) for p, t in parts if p.exists()]
                counts[f"missing_{table}"] += len(parts) - len(present)
                if not present:
                    continue
                loaded_hours.update(t for _, t in present)
                with self._parts(present):
                    counts[f"deleted_{table}"] += self._scalar(
                        f"DELETE FROM {table} WHERE interval_start IN (SELECT _part_start FROM _parts)")
                    select = ", ".join(f"r.{_cast(c)}" for c in columns)
                    dedupe = (f" QUALIFY row_number() OVER (PARTITION BY r.filename, {_prefixed(key)} "
                              f"ORDER BY {_prefixed(order)}) = 1") if key else ""
                    counts[table] += self._scalar(
                        f"INSERT INTO {table} ({', '.join(columns)}, interval_start) "
                        f"SELECT {select}, p._part_start FROM read_parquet(?, filename = true) r "
                        f"JOIN _parts p ON p._part_file = r.filename{dedupe}", [[str(p) for p, _ in present]])
                    if table == "candidates":
                        counts["images_upserted"] += self._upsert_images(present)
            scores = [(partition_path(lake, "scores", h), utc(h.start)) for h in hours]
            present_scores = [(p, t) for p, t in scores if p.exists()]
            counts["missing_scores"] += len(scores) - len(present_scores)
            rescores = [(p, utc(h.start)) for h in hours for p in sorted(rescore_dir(self.settings, h).glob("*.parquet"))]
            loaded_hours.update(t for _, t in present_scores + rescores)
            counts.update(self._load_scores(present_scores, rescores))
        counts["hours_loaded"] += len(loaded_hours)
        counts["hours_empty"] += len(hours) - len(loaded_hours)
        return StepResult("load", str(interval), str(self.settings.warehouse_path), dict(counts))

    @contextmanager
    def _parts(self, parts: list[tuple[Path, datetime]]) -> Iterator[None]:
        """Register (_part_file, _part_start): which hour each partition file belongs to."""
        table = pa.table({"_part_file": [str(p) for p, _ in parts],
                          "_part_start": pa.array([t for _, t in parts], type=pa.timestamp("us"))})
        self.con.register("_parts", table)
        try:
            yield
        finally:
            self.con.unregister("_parts")

    def _load_scores(self, pipeline: list[tuple[Path, datetime]], rescores: list[tuple[Path, datetime]]) -> Counter[str]:
        """Pipeline partitions replace their hours' pipeline rows; rescore files replace their (hour, model) rows.

        A rescore row never shadows a pipeline row of the same (candidate, model): the pipeline wins.
        """
        counts: Counter[str] = Counter()
        select = ", ".join(f"r.{_cast(c)}" for c in SCORE_COLUMNS)
        cols = ", ".join(SCORE_COLUMNS)
        for origin, parts in (("score", pipeline), ("rescore", rescores)):
            if not parts:
                continue
            key = "r.candidate_id" if origin == "score" else "r.candidate_id, r.novelty_model"
            with self._parts(parts):
                self.con.execute(
                    f"CREATE OR REPLACE TEMP TABLE _new_scores AS SELECT {select}, p._part_start AS interval_start "
                    f"FROM read_parquet(?, filename = true) r JOIN _parts p ON p._part_file = r.filename "
                    f"{'WHERE r.novelty_model IS NOT NULL ' if origin == 'rescore' else ''}"
                    f"QUALIFY row_number() OVER (PARTITION BY r.filename, {key} "
                    f"ORDER BY r.scored_at DESC NULLS LAST, r.novelty_model) = 1", [[str(p) for p, _ in parts]])
                try:
                    if origin == "score":  # every pipeline row of these hours, even if the new file is empty
                        counts["deleted_scores"] += self._scalar(
                            "DELETE FROM scores s WHERE s.interval_start IN (SELECT _part_start FROM _parts) "
                            "AND (s.origin = 'score' OR EXISTS (SELECT 1 FROM _new_scores n WHERE n.interval_start = "
                            "s.interval_start AND n.novelty_model = s.novelty_model))")
                    else:
                        counts["deleted_scores"] += self._scalar(
                            "DELETE FROM scores s WHERE s.origin = 'rescore' AND s.interval_start IN "
                            "(SELECT _part_start FROM _parts) AND EXISTS (SELECT 1 FROM _new_scores n WHERE "
                            "n.interval_start = s.interval_start AND n.novelty_model = s.novelty_model)")
                    counts["scores" if origin == "score" else "rescores"] += self._scalar(
                        f"INSERT INTO scores ({cols}, interval_start, origin) SELECT n.*, '{origin}' FROM _new_scores n "
                        f"ANTI JOIN scores s ON s.origin = 'score' AND s.interval_start = n.interval_start "
                        f"AND s.candidate_id = n.candidate_id AND s.novelty_model = n.novelty_model")
                finally:
                    self.con.execute("DROP TABLE IF EXISTS _new_scores")
        return counts

    def _upsert_images(self, parts: list[tuple[Path, datetime]]) -> int:
        """Distinct downloaded images; first_seen only moves earlier, so reloads change nothing."""
        before = self._scalar("SELECT count(*) FROM images")
        self.con.execute(
            "INSERT INTO images (sha256, path, format, width, height, bytes, first_seen) "
            "SELECT r.sha256, arg_min(r.path, r.candidate_id), arg_min(r.format, r.candidate_id), "
            "arg_min(r.width, r.candidate_id), arg_min(r.height, r.candidate_id), arg_min(r.bytes, r.candidate_id), "
            "min(p._part_start) FROM read_parquet(?, filename = true) r JOIN _parts p ON p._part_file = r.filename "
            "WHERE r.status = 'downloaded' AND r.sha256 IS NOT NULL GROUP BY r.sha256 "
            "ON CONFLICT (sha256) DO UPDATE SET first_seen = least(images.first_seen, excluded.first_seen), "
            "path = coalesce(images.path, excluded.path), format = coalesce(images.format, excluded.format), "
            "width = coalesce(images.width, excluded.width), height = coalesce(images.height, excluded.height), "
            "bytes = coalesce(images.bytes, excluded.bytes)", [[str(p) for p, _ in parts]])
        return self._scalar("SELECT count(*) FROM images") - before

    def _scalar(self, sql: str, params: list[Any] | None = None) -> int:
        row = _first(self.con.execute(sql, params or []).fetchall())
        return int(row[0]) if row and row[0] is not None else 0

    def _require_writer(self) -> None:
        if self.read_only:
            raise RuntimeError("this warehouse connection is read-only")

    # -- runs -------------------------------------------------------------------------
    def record_run(self, run_id: str, dag_id: str | None, step: str, interval: Interval | None = None,
                   started_at: datetime | float | None = None, finished_at: datetime | float | None = None,
                   status: str = "success", counts: Mapping[str, Any] | None = None,
                   durations: Mapping[str, Any] | None = None,
                   rejection_reasons: Mapping[str, Any] | None = None) -> None:
        """Upsert one step's row of counts, durations and rejection reasons (a retry bumps attempts)."""
        self._require_writer()
        self.con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (run_id, step) DO UPDATE SET "
            "dag_id = excluded.dag_id, interval_start = excluded.interval_start, interval_end = excluded.interval_end, "
            "started_at = excluded.started_at, finished_at = excluded.finished_at, status = excluded.status, "
            "counts = excluded.counts, durations = excluded.durations, rejection_reasons = excluded.rejection_reasons, "
            "attempts = runs.attempts + 1",
            [run_id, dag_id, step, utc(interval.start) if interval else None, utc(interval.end) if interval else None,
             utc(started_at), utc(finished_at), status, _json(dict(counts or {})),
             _json(dict(durations)) if durations is not None else None,
             _json(dict(rejection_reasons)) if rejection_reasons is not None else None])

    # -- model versions -----------------------------------------------------------------
    def upsert_model_version(self, version: str, kind: str, params: Mapping[str, Any] | None = None,
                             train_size: int | None = None, metrics: Mapping[str, Any] | None = None,
                             threshold: float | None = None, created_at: datetime | float | str | None = None) -> None:
        """Record a model version (its activation state is left alone; see set_active_model)."""
        self._require_writer()
        self.con.execute(
            "INSERT INTO model_versions (version, kind, params, train_size, metrics, threshold, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version) DO UPDATE SET kind = excluded.kind, "
            "params = excluded.params, train_size = excluded.train_size, metrics = excluded.metrics, "
            "threshold = excluded.threshold, created_at = coalesce(model_versions.created_at, excluded.created_at)",
            [version, kind, _json(dict(params or {})), None if train_size is None else int(train_size),
             _json(dict(metrics or {})), None if threshold is None else float(threshold),
             utc(created_at) if created_at is not None else _now()])

    def set_active_model(self, kind: str, version: str) -> None:
        """Make ``version`` the only active model of its kind, atomically."""
        self._require_writer()
        with self.transaction():
            row = _first(self.con.execute("SELECT kind FROM model_versions WHERE version = ?", [version]).fetchall())
            if row is None:
                raise KeyError(f"unknown model version {version!r}: record it with upsert_model_version first")
            if row[0] != kind:
                raise ValueError(f"model version {version!r} is a {row[0]} model, not {kind}")
            self.con.execute("UPDATE model_versions SET active = false WHERE kind = ? AND active AND version <> ?",
                             [kind, version])
            self.con.execute("UPDATE model_versions SET active = true, activated_at = ? "
                             "WHERE version = ? AND NOT active", [_now(), version])

    def active_model(self, kind: str) -> dict[str, Any] | None:
        found = self.rows("SELECT * FROM model_versions WHERE kind = ? AND active", [kind])
        return found[0] if found else None

    # -- gallery ------------------------------------------------------------------------
    def add_to_gallery(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert gallery images (keyed by sha256); an existing one keeps its origin, gains a missing embedding."""
        self._require_writer()
        rows = list(rows)
        if not rows:
            return 0
        table = pa.table({
            "sha256": [r["sha256"] for r in rows],
            "path": [None if r.get("path") is None else str(r["path"]) for r in rows],
            "phash": [r.get("phash") for r in rows],
            "phash_mirror": [r.get("phash_mirror") for r in rows],
            "embedding": pa.array([None if r.get("embedding") is None
                                   else np.asarray(r["embedding"], dtype=np.float32) for r in rows],
                                  type=pa.list_(pa.float32())),
            "embed_model": [r.get("embed_model") for r in rows],
            "source": [r.get("source") or "liked" for r in rows],
            "added_at": pa.array([utc(r.get("added_at")) or _now() for r in rows], type=pa.timestamp("us")),
            "post_id": [r.get("post_id") for r in rows],
            "candidate_id": [r.get("candidate_id") for r in rows],
        })
        before = self._scalar("SELECT count(*) FROM gallery")
        self.con.register("_gallery_new", table)
        try:
            self.con.execute(
                "INSERT INTO gallery SELECT * FROM _gallery_new "
                "QUALIFY row_number() OVER (PARTITION BY sha256 ORDER BY added_at) = 1 "
                "ON CONFLICT (sha256) DO UPDATE SET "
                "embedding = CASE WHEN excluded.embedding IS NULL THEN gallery.embedding ELSE excluded.embedding END, "
                "embed_model = CASE WHEN excluded.embedding IS NULL THEN gallery.embed_model ELSE excluded.embed_model END, "
                "phash = coalesce(excluded.phash, gallery.phash), "
                "phash_mirror = coalesce(excluded.phash_mirror, gallery.phash_mirror), "
                "path = coalesce(gallery.path, excluded.path)")
        finally:
            self.con.unregister("_gallery_new")
        return self._scalar("SELECT count(*) FROM gallery") - before

    def gallery_embeddings(self, model: str | None = None) -> tuple[list[str], np.ndarray]:
        """(sha256s, float32 matrix) of gallery images embedded by ``model`` (all models when None)."""
        where = "embedding IS NOT NULL" + (" AND embed_model = ?" if model else "")
        table = self.con.sql(f"SELECT sha256, embedding FROM gallery WHERE {where} ORDER BY added_at, sha256",
                             params=[model] if model else None).to_arrow_table()
        return table.column("sha256").to_pylist(), _matrix(table.column("embedding"))

    def stream_embeddings(self, model: str | None = None, limit: int | None = 50_000) -> np.ndarray:
        """Embeddings of images seen in the stream and not in the gallery (the unlabelled set), newest first."""
        params: list[Any] = []
        where = "e.sha256 NOT IN (SELECT sha256 FROM gallery)"
        if model:
            where += " AND e.model = ?"
            params.append(model)
        sql = (f"SELECT e.embedding FROM embeddings e WHERE {where} "
               f"QUALIFY row_number() OVER (PARTITION BY e.sha256 ORDER BY e.interval_start DESC) = 1 "
               f"ORDER BY e.interval_start DESC, e.sha256")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        table = self.con.sql(sql, params=params or None).to_arrow_table()
        return _matrix(table.column("embedding"))

    def gallery_hashes(self) -> list[tuple[str, str | None, str | None, str | None]]:
        """(sha256, phash, phash_mirror, candidate_id) per gallery image, oldest first.

        The fourth field is the candidate the image was published from (None for liked images):
        the dedupe index uses it so rescoring an interval never matches an image against itself.
        """
        return [tuple(r) for r in self.con.execute(
            "SELECT sha256, phash, phash_mirror, candidate_id FROM gallery ORDER BY added_at, sha256").fetchall()]

    # -- publications -------------------------------------------------------------------
    def publication(self, sha256: str, target: str) -> dict[str, Any] | None:
        """The publication record of an image at a target, or None if never attempted."""
        found = self.rows("SELECT * FROM publications WHERE sha256 = ? AND target = ?", [sha256, target])
        return found[0] if found else None

    def record_publication(self, sha256: str, target: str, status: str, location: str | None = None,
                           error: str | None = None, candidate_id: str | None = None,
                           published_at: datetime | float | None = None) -> None:
        """Upsert the (sha256, target) outcome; attempts counts every call; a success is never downgraded."""
        self._require_writer()
        now = _now()
        when = utc(published_at) if published_at is not None else (now if status == "published" else None)
        self.con.execute(
            "INSERT INTO publications VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (sha256, target) DO UPDATE SET "
            "status = CASE WHEN publications.status = 'published' THEN publications.status ELSE excluded.status END, "
            "location = CASE WHEN publications.status = 'published' THEN publications.location ELSE excluded.location END, "
            "error = CASE WHEN publications.status = 'published' THEN publications.error ELSE excluded.error END, "
            "published_at = coalesce(publications.published_at, excluded.published_at), "
            "candidate_id = CASE WHEN publications.status = 'published' "
            "THEN coalesce(publications.candidate_id, excluded.candidate_id) "
            "ELSE coalesce(excluded.candidate_id, publications.candidate_id) END, "
            "attempts = publications.attempts + 1, updated_at = excluded.updated_at",
            [sha256, target, status, location, error, when, candidate_id, now])

    # -- watch list ---------------------------------------------------------------------
    def watch_list(self) -> list[str]:
        """Active watch-list subreddits, oldest first."""
        return [r[0] for r in self.con.execute(
            "SELECT subreddit FROM watch_list WHERE active ORDER BY added_at, subreddit").fetchall()]

    def add_to_watch_list(self, subreddit: str, added_by: str = "user", note: str | None = None) -> None:
        """Add (or re-activate) a subreddit."""
        self._require_writer()
        name = subreddit.removeprefix("r/")
        existing = _first(self.con.execute("SELECT subreddit FROM watch_list WHERE lower(subreddit) = lower(?)",
                                           [name]).fetchall())
        if existing:
            self.con.execute("UPDATE watch_list SET active = true, note = coalesce(?, note) WHERE subreddit = ?",
                             [note, existing[0]])
        else:
            self.con.execute("INSERT INTO watch_list VALUES (?, ?, ?, true, ?)", [name, _now(), added_by, note])

    def set_watch_active(self, subreddit: str, active: bool, note: str | None = None) -> bool:
        """Activate or deactivate a subreddit; False when it is not on the list."""
        self._require_writer()
        row = self.con.execute("UPDATE watch_list SET active = ?, note = coalesce(?, note) "
                               "WHERE lower(subreddit) = lower(?) RETURNING subreddit",
                               [active, note, subreddit.removeprefix("r/")]).fetchall()
        return bool(row)


# ---------------------------------------------------------------------------------------
# module-level steps
# ---------------------------------------------------------------------------------------
def load_interval(settings: Settings, interval: Interval) -> StepResult:
    """The load step: the interval's lake partitions into the warehouse (idempotent)."""
    with Warehouse.open(settings) as wh:
        return wh.load(interval)


def rescore_dir(settings: Settings, hour: Interval) -> Path:
    """Where rescores of an hour live in the lake: one Parquet file per novelty model version."""
    return partition_dir(settings.lake_dir, "rescores", hour)


def rescore_path(settings: Settings, hour: Interval, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", version)
    return rescore_dir(settings, hour) / f"{safe}.parquet"


def rescore(settings: Settings, interval: Interval, model: Any = None) -> StepResult:
    """Re-score the interval's stored embeddings with the active novelty model (no downloads).

    New rows, keyed by the new model version, go to ``lake/rescores/interval=<hour>/<version>.parquet``
    (so a warehouse rebuilt from the lake keeps them) and into the warehouse beside the old rows.
    Only candidates that reached the novelty stage are re-scored; the watermark probability and
    perceptual-duplicate evidence are copied from the pipeline's row.
    """
    if model is None:
        from mining.novelty import load_active

        model = load_active(settings)
        if model is None:
            raise RuntimeError(f"no active novelty model under {settings.novelty_dir}: run `mining init --liked DIR`")
    version = str(model.version)
    embed_model = getattr(model, "embedder", None)
    counts: Counter[str] = Counter()
    written: list[Interval] = []
    scored_at = _now()
    with Warehouse.open(settings) as wh:
        for hour in interval.hours():
            scores, embeddings = _stored_scores(settings, wh, hour, counts)
            if scores is None:
                counts["hours_without_scores"] += 1
                continue
            rows = rescore_rows(scores, embeddings, model, version, embed_model, scored_at, hour, counts)
            atomic_write_table(pa.Table.from_pylist(rows, SCORES), rescore_path(settings, hour, version))
            written.append(hour)
            counts["rescored"] += len(rows)
            counts.update(f"rescored_{r['decision']}" for r in rows)
        known = wh._scalar("SELECT count(*) FROM model_versions WHERE version = ?", [version])
        if not known and hasattr(model, "kind"):
            wh.upsert_model_version(version=version, kind="novelty", params=getattr(model, "params", None),
                                    train_size=getattr(model, "train_size", None),
                                    metrics=getattr(model, "metrics", None), threshold=float(model.threshold),
                                    created_at=getattr(model, "created_at", None))
        with wh.transaction():
            counts.update(wh._load_scores([], [(rescore_path(settings, h, version), utc(h.start)) for h in written]))
    counts.pop("missing_scores", None)
    path = str(rescore_dir(settings, written[0]).parent) if written else None
    return StepResult("rescore", str(interval), path, dict(counts))


def _stored_scores(settings: Settings, wh: Warehouse, hour: Interval,
                   counts: Counter[str]) -> tuple[list[dict[str, Any]] | None, pa.Table | None]:
    """The hour's pipeline score rows and embeddings: from the lake, else from the warehouse (a pruned lake)."""
    scores = read_partition(settings.lake_dir, "scores", hour)
    if scores is not None:
        return scores.to_pylist(), read_partition(settings.lake_dir, "embeddings", hour)
    start = utc(hour.start)
    rows = wh.rows(f"SELECT {', '.join(SCORE_COLUMNS)} FROM scores WHERE interval_start = ? AND origin = 'score'",
                   [start])
    if not rows:
        return None, None
    counts["hours_from_warehouse"] += 1
    embeddings = wh.con.sql("SELECT sha256, model, dim, embedding FROM embeddings WHERE interval_start = ?",
                            params=[start]).to_arrow_table()
    return rows, embeddings


def rescore_rows(scores: list[dict[str, Any]], embeddings: pa.Table | None, model: Any, version: str,
                 embed_model: str | None, scored_at: datetime, hour: Interval,
                 counts: Counter[str] | None = None) -> list[dict[str, Any]]:
    """New score rows for the candidates of one hour that reached the novelty stage."""
    counts = counts if counts is not None else Counter()
    vectors = _vectors(embeddings, embed_model, counts)
    todo = []
    for row in scores:
        if row.get("novelty_score") is None or row.get("sha256") is None:
            counts["not_at_novelty_stage"] += 1
        elif row.get("novelty_model") == version:
            counts["already_scored_by_model"] += 1
        elif row["sha256"] not in vectors:
            counts["missing_embedding"] += 1
        else:
            todo.append(row)
    if not todo:
        return []
    todo.sort(key=lambda r: r["candidate_id"])
    scorer = model.score if hasattr(model, "score") else model.model.score
    values = np.asarray(scorer(np.stack([vectors[r["sha256"]] for r in todo])), dtype=np.float64).reshape(-1)
    threshold = float(model.threshold)
    out = []
    for old, value in zip(todo, values, strict=True):
        s = float(value)
        new = {name: old.get(name) for name in SCORES.names}
        new.update(novelty_model=version, novelty_score=float(s), novelty_threshold=threshold,
                   scored_at=scored_at, interval_start=hour.start)
        wm, wt = old.get("watermark_prob"), old.get("watermark_threshold")
        if s < threshold:
            decision, stage = "rejected", "novelty"
            reason = f"novelty: score {s:.4f} < threshold {threshold:.4f} (model {version})"
            new.update(phash=None, duplicate_of=None, hamming=None)
        elif wm is not None and wt is not None and wm >= wt:
            decision, stage = "rejected", "watermark"
            reason = f"watermark: probability {wm:.3f} >= threshold {wt:.3f} (stored, {old.get('watermark_model')})"
            new.update(phash=None, duplicate_of=None, hamming=None)
        elif old.get("stage") == "dedupe" and old.get("duplicate_of"):
            decision, stage = "duplicate", "dedupe"
            reason = f"{old.get('reason')} (stored)"
        else:
            decision, stage = "accepted", "accepted"
            wm_text = (f"watermark {wm:.3f} < {wt:.3f} (stored)" if wm is not None and wt is not None
                       else "watermark not checked (no stored probability)")
            dedupe_text = "" if old.get("decision") == "accepted" else ", dedupe not checked"
            reason = f"accepted: novelty {s:.4f} >= {threshold:.4f}, {wm_text}{dedupe_text}"
        new.update(decision=decision, stage=stage, reason=f"rescore (model {version}): {reason}")
        out.append(new)
    return out


def _vectors(embeddings: pa.Table | None, embed_model: str | None, counts: Counter[str]) -> dict[str, np.ndarray]:
    """sha256 -> embedding for the rows made by ``embed_model`` (every row when None)."""
    if embeddings is None or embeddings.num_rows == 0:
        return {}
    if embed_model:
        mask = pc.equal(embeddings.column("model"), embed_model)
        other = embeddings.num_rows - pc.sum(mask).as_py()
        if other:
            counts["other_embedder"] += other
        embeddings = embeddings.filter(mask)
    embeddings = embeddings.filter(pc.is_valid(embeddings.column("embedding")))
    if embeddings.num_rows == 0:
        return {}
    matrix = _matrix(embeddings.column("embedding"))
    return dict(zip(embeddings.column("sha256").to_pylist(), matrix, strict=True))


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """list<float> column -> (n, d) float32 matrix (every row must have the same width)."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    arr = column.combine_chunks()
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(len(arr), -1)


def _first(rows: list[tuple]) -> tuple | None:
    """First row of a fully fetched result (DuckDB 2 keeps a half-read result blocking the connection)."""
    return rows[0] if rows else None


def _prefixed(columns: str) -> str:
    """'a, b DESC' -> 'r.a, r.b DESC' (qualify lake columns in the loader's joins)."""
    return ", ".join(f"r.{part.strip()}" for part in columns.split(","))


def _cast(column: str) -> str:
    return f"{column}::TIMESTAMP AS {column}" if column in TIMESTAMP_COLUMNS else column


def _is_current(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether every packaged migration has been applied to the open file."""
    latest = max((m.version for m in migrations()), default=0)
    try:
        row = _first(con.execute("SELECT max(version) FROM schema_migrations").fetchall())
    except duckdb.Error:
        return False
    return bool(row and row[0] is not None and row[0] >= latest)


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Open DuckDB; a lock held by a process outside our file lock is waited for, not fatal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = clock.monotonic() + timeout_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or clock.monotonic() >= deadline:
                raise
            clock.sleep(0.2)
    con.execute("SET TimeZone = 'UTC'")
    return con


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT/WITH/DESCRIBE/SHOW/SUMMARIZE/EXPLAIN/PRAGMA statement."""
    try:
        statements = duckdb.connect().extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlyQueryError(f"cannot parse the query: {exc}") from None
    if len(statements) != 1:
        raise ReadOnlyQueryError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise ReadOnlyQueryError(
            f"mining sql is read-only: refusing a {kind} statement "
            "(use SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN or PRAGMA)")


def read_only_query(settings: Settings, sql: str) -> tuple[list[str], list[tuple]]:
    """What ``mining sql`` runs: a checked read-only statement on a read-only connection."""
    check_read_only(sql)
    with Warehouse.open(settings, read_only=True) as wh:
        rel = wh.con.sql(sql)
        if rel is None:
            return [], []
        json_columns = [i for i, t in enumerate(rel.types) if str(t) == "JSON"]
        table = rel.to_arrow_table()
    data = [table.column(i).to_pylist() for i in range(table.num_columns)]
    for i in json_columns:  # JSON columns come back as text: hand them on as structures
        data[i] = [None if v is None else json.loads(v) for v in data[i]]
    return list(table.column_names), list(zip(*data, strict=True)) if data else []
