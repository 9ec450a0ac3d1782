"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from mining.lake import Interval
from mining.settings import Settings, load_settings


def add_interval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", required=True, help="interval start, ISO 8601 (UTC if naive)")
    parser.add_argument("--end", help="interval end, ISO 8601; default start + 1 hour")


def interval_from(args: argparse.Namespace) -> Interval:
    return Interval.parse(args.start, args.end)


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from the environment with CLI overrides applied (validated)."""
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})
