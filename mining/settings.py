"""One typed, frozen settings object for every step.

Deployment values come from ``MINING_*`` environment variables (and an optional TOML
file named by ``MINING_CONFIG``); per-run knobs are applied with :meth:`Settings.replace`.
Everything is validated in :func:`load_settings`, before any network call, so a typo
fails the run at once with a message naming the variable instead of hours later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mining import __version__

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_USER_AGENT = f"python:mining:{__version__} (batch image curator; +https://github.com/mining-etl/mining)"
OAUTH_BASE_URL = "https://oauth.reddit.com"
ANON_BASE_URL = "https://www.reddit.com"
TOKEN_URL = "https://www.reddit.com/api/v1/access_token"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Secret:
    """A string that never prints itself, so it cannot leak into logs or tables."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class Settings:
    """Every deployment value of mining; see the README's configuration table."""

    home: Path = Path("~/.mining")
    models_dir: Path = PROJECT_ROOT / "models"  # registry specs and built weights
    gallery_dir: Path | None = None  # default: <home>/gallery

    # Reddit
    reddit_base_url: str | None = None  # None: oauth.reddit.com with credentials, else www.reddit.com
    reddit_token_url: str = TOKEN_URL
    reddit_client_id: str = ""
    reddit_client_secret: Secret = Secret("")
    user_agent: str = DEFAULT_USER_AGENT
    sources: tuple[str, ...] = ("all",)  # always scraped; the watch list is added to these
    watch_list: tuple[str, ...] = ("EarthPorn", "LandscapePhotography", "SkyPorn", "WaterPorn")
    requests_per_minute: int | None = None  # None: 100 with OAuth, 10 anonymous
    request_timeout_s: float = 20.0
    max_retries: int = 5
    listing_page_size: int = 100
    listing_max_pages: int = 10  # Reddit stops at about 1000 posts
    # -- reddit/listings extra settings (helper: reddit) --
    listing_depth_cap: int = 1000  # an end of listing this deep is Reddit's cap (a gap), not the real end
    collector_sources: tuple[str, ...] = ("all",)  # high-volume sources the light collector polls
    collector_pages: int = 3  # requests per source per collector run

    # Candidates and downloads
    allow_nsfw: bool = False
    allow_animated: bool = False
    min_width: int = 1280
    min_height: int = 1024
    max_aspect_wh: float = 3.0
    max_aspect_hw: float = 2.0
    imgur_client_id: Secret = Secret("")
    flickr_api_key: Secret = Secret("")
    allowed_hosts: tuple[str, ...] = ()  # hosts or CIDRs exempt from the private-address guard
    max_image_bytes: int = 40 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    download_workers: int = 8
    per_host_concurrency: int = 2
    per_host_rate_per_s: float = 5.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    download_deadline_s: float = 60.0
    max_redirects: int = 5
    # -- links/download extra settings (helper: download) --
    imgur_api_url: str = "https://api.imgur.com/3"  # tests point it at the local server
    flickr_api_url: str = "https://api.flickr.com/services/rest/"

    # Models and scoring
    embedder: str = "efficientnet-lite0"
    watermark_model: str = "watermark-default"
    embed_batch_size: int = 16
    intra_op_threads: int = 0  # 0: number of cores
    novelty_target_recall: float = 0.9
    novelty_target_acceptance: float | None = None
    watermark_threshold: float | None = None  # None: the trained detector's calibrated threshold
    watermark_on_all: bool = False
    # -- models/embed extra settings (helper: models) --
    embed_decode_workers: int = 0  # image-decoding threads running ahead of inference; 0: number of cores
    # -- watermark extra settings (helper: watermark) --
    # -- novelty extra settings (helper: novelty) --
    novelty_gmm_components: int = 16  # the original system's mixture size (fewer for tiny galleries)
    novelty_gmm_covariance: str = "full"  # full | tied | diag | spherical
    novelty_knn_k: int = 5  # neighbours averaged by the cosine model
    novelty_pca_dims: int = 128  # PCA before the GMM (0: none); bounds full-covariance cost at 1280-d
    novelty_max_fit_rows: int = 50_000  # seeded sample of the gallery a model is fitted on (memory bound)
    novelty_gmm_min_gallery: int = 2000  # no stream yet: kNN below this many liked images, GMM from here on

    # Dedupe and publishing
    phash_size: int = 8  # 64-bit pHash: beat 256-bit on recall and false matches (docs/dedupe.md)
    phash_max_distance: int = 14  # measured: recall 0.997 on repost transforms, 0.006% false pairs
    publisher: str = "folder"  # folder | http | none
    publish_url: str = ""
    publish_secret: Secret = Secret("")
    dry_run: bool = False
    # -- dedupe/publish extra settings (helper: publish) --
    # -- warehouse extra settings (helper: warehouse) --
    warehouse_lock_timeout_s: float = 600.0  # writers wait this long for the single-writer lock
    warehouse_read_timeout_s: float = 30.0  # `mining sql` and other readers wait this long
    # -- weekly extra settings --
    discovery_auto_promote: bool = False  # add r/all subreddits to the watch list without asking
    discovery_max_per_week: int = 3
    discovery_min_accepted: int = 3
    discovery_min_rate: float = 0.2
    discovery_barren_weeks: int = 4  # watch-list entries with nothing accepted this long...
    discovery_barren_min_candidates: int = 20  # ...out of at least this many candidates
    refit_unlabelled_weeks: int = 4  # candidates seen this far back form the unlabelled stream
    refit_max_unlabelled: int = 20000
    report_contact_sheet_size: int = 24

    # ---- derived paths -------------------------------------------------------------
    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def warehouse_path(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def novelty_dir(self) -> Path:
        return self.home / "novelty"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def gallery_path(self) -> Path:
        return self.gallery_dir if self.gallery_dir is not None else self.home / "gallery"

    @property
    def oauth(self) -> bool:
        return bool(self.reddit_client_id and self.reddit_client_secret)

    @property
    def api_base_url(self) -> str:
        if self.reddit_base_url:
            return self.reddit_base_url.rstrip("/")
        return OAUTH_BASE_URL if self.oauth else ANON_BASE_URL

    @property
    def budget_per_minute(self) -> int:
        if self.requests_per_minute is not None:
            return self.requests_per_minute
        return 100 if self.oauth else 10

    @property
    def all_sources(self) -> tuple[str, ...]:
        """Sources in a stable order without duplicates (case-insensitive)."""
        seen: dict[str, str] = {}
        for name in (*self.sources, *self.watch_list):
            seen.setdefault(name.lower(), name)
        return tuple(seen.values())

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with per-run knobs applied (Airflow Params, CLI flags)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise SettingsError naming the first bad value."""

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise SettingsError(f"{_env_name(name)}: {why}")

        for name in ("reddit_token_url", "publish_url"):
            value = getattr(self, name)
            need(not value or value.startswith(("http://", "https://")), name, f"not an http(s) URL: {value!r}")
        if self.reddit_base_url:
            need(self.reddit_base_url.startswith(("http://", "https://")), "reddit_base_url",
                 f"not an http(s) URL: {self.reddit_base_url!r}")
        need(bool(self.user_agent.strip()), "user_agent", "must not be empty (Reddit requires a descriptive one)")
        need(bool(self.reddit_client_id) == bool(self.reddit_client_secret), "reddit_client_secret",
             "client id and secret must be set together")
        for name in ("request_timeout_s", "connect_timeout_s", "read_timeout_s", "download_deadline_s",
                     "per_host_rate_per_s", "max_aspect_wh", "max_aspect_hw"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("listing_page_size", "listing_max_pages", "max_image_bytes", "max_image_pixels",
                     "download_workers", "per_host_concurrency", "embed_batch_size", "phash_size"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(1 <= self.listing_page_size <= 100, "listing_page_size", "Reddit serves 1..100 per page")
        need(self.requests_per_minute is None or self.requests_per_minute >= 1, "requests_per_minute", "must be >= 1")
        need(self.min_width >= 0 and self.min_height >= 0, "min_width", "must be >= 0")
        need(0 < self.novelty_target_recall <= 1, "novelty_target_recall", "must be in (0, 1]")
        need(self.novelty_target_acceptance is None or 0 < self.novelty_target_acceptance <= 1,
             "novelty_target_acceptance", "must be in (0, 1]")
        need(self.watermark_threshold is None or 0 <= self.watermark_threshold <= 1, "watermark_threshold",
             "must be in [0, 1]")
        need(0 <= self.phash_max_distance <= self.phash_size**2, "phash_max_distance", "must be in [0, hash bits]")
        need(self.publisher in ("folder", "http", "none"), "publisher", "one of folder, http, none")
        need(self.publisher != "http" or bool(self.publish_url), "publish_url", "required by MINING_PUBLISHER=http")
        for name in (*self.sources, *self.watch_list):
            need(_valid_subreddit(name), "watch_list", f"not a subreddit name: {name!r}")
        for entry in self.allowed_hosts:
            need(bool(entry.strip()), "allowed_hosts", "empty entry")
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError as exc:
                    raise SettingsError(f"MINING_ALLOWED_HOSTS: bad CIDR {entry!r}: {exc}") from None


def _valid_subreddit(name: str) -> bool:
    core = name.removeprefix("r/")
    return 2 <= len(core) <= 50 and all(c.isalnum() or c in "_+" for c in core)


def _env_name(field_name: str) -> str:
    return "MINING_" + field_name.upper()


def _coerce(name: str, raw: Any, annotation: str) -> Any:
    """Turn an env string (or TOML value) into the field's type, naming the variable on failure."""
    try:
        if annotation.startswith("Secret"):
            return raw if isinstance(raw, Secret) else Secret(str(raw))
        if isinstance(raw, str) and raw.strip() == "" and "None" in annotation:
            return None
        if annotation.startswith("tuple"):
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            return tuple(str(p) for p in raw)
        base = annotation.replace(" | None", "")
        if base == "bool":
            if isinstance(raw, bool):
                return raw
            low = str(raw).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected a boolean, got {raw!r}")
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base == "Path":
            return Path(str(raw)).expanduser()
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{_env_name(name)}: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build and validate Settings: defaults < TOML file (MINING_CONFIG) < env vars < overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    fields = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    config = env.get("MINING_CONFIG")
    if config:
        path = Path(config).expanduser()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"MINING_CONFIG: cannot read {path}: {exc}") from None
        data = data.get("mining", data)
        for key, raw in data.items():
            if key not in fields:
                raise SettingsError(f"MINING_CONFIG: unknown setting {key!r} in {path}")
            values[key] = _coerce(key, raw, fields[key])
    for name, annotation in fields.items():
        raw = env.get(_env_name(name))
        if raw is not None:
            values[name] = _coerce(name, raw, annotation)
    # Reddit credentials are also accepted under their conventional names.
    for name, alias in (("reddit_client_id", "REDDIT_CLIENT_ID"), ("reddit_client_secret", "REDDIT_CLIENT_SECRET")):
        if name not in values and env.get(alias):
            values[name] = _coerce(name, env[alias], fields[name])
    for key, raw in overrides.items():
        if key not in fields:
            raise SettingsError(f"unknown setting {key!r}")
        values[key] = raw if not isinstance(raw, str) else _coerce(key, raw, fields[key])
    if "home" in values:
        values["home"] = Path(values["home"]).expanduser()
    settings = Settings(**values)
    if settings.home == Path("~/.mining"):
        settings = dataclasses.replace(settings, home=Path("~/.mining").expanduser())
    settings.validate()
    return settings
