"""`mining sql`: a read-only query against the warehouse, printed as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="run a read-only SQL query on the warehouse (see docs/warehouse.md)")
    p.add_argument("query", help='one SELECT/WITH/DESCRIBE/SHOW/PRAGMA statement, e.g. "SELECT * FROM mined_images"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default table)")
    p.add_argument("--max-width", type=int, default=80, help="table format: truncate cells wider than this (0: never)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import duckdb

    from mining.settings import load_settings
    from mining.warehouse import ReadOnlyQueryError, WarehouseLockTimeout, read_only_query

    settings = load_settings()
    try:
        columns, rows = read_only_query(settings, args.query)
    except ReadOnlyQueryError as exc:
        print(f"mining sql: {exc}", file=sys.stderr)
        return 2
    except WarehouseLockTimeout as exc:
        print(f"mining sql: {exc}", file=sys.stderr)
        return 3
    except duckdb.Error as exc:
        print(f"mining sql: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(columns, rows, args.format, args.max_width))
    return 0


def render(columns: list[str], rows: list[tuple], fmt: str, max_width: int = 80) -> str:
    """The result as text: an aligned table, CSV with a header, or one JSON array of row objects."""
    if fmt == "json":
        return json.dumps([{c: jsonable(v) for c, v in zip(columns, row, strict=True)} for row in rows],
                          ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _text(v) for v in row])
        return buf.getvalue()
    return table(columns, rows, max_width)


def table(columns: list[str], rows: list[tuple], max_width: int = 80) -> str:
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows)
               and not all(r[i] is None for r in rows) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    lines = [line(list(columns)), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _cell(value: Any, max_width: int) -> str:
    text = "NULL" if value is None else _text(value)
    text = text.replace("\n", " ")
    if max_width and len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict | tuple):
        return json.dumps(jsonable(value), ensure_ascii=False)
    return str(jsonable(value))


def jsonable(value: Any) -> Any:
    """A warehouse value as JSON: timestamps ISO 8601 (naive ones are UTC: 'Z'), lists as arrays."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)
