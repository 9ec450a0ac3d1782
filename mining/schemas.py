"""Arrow schemas of the lake's partitions: the contract between steps.

Every step writes exactly these columns, so the warehouse loader, rescoring and the
reports can rely on types instead of guessing. Embedding width is not fixed here: it is
whatever the model produces (``list<float32>``).
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# One row per post, per interval that owns it (by created_utc).
POSTS = pa.schema([
    ("post_id", pa.string()),          # base36 id without the t3_ prefix
    ("subreddit", pa.string()),
    ("source", pa.string()),           # listing it was seen through first: "all", "EarthPorn", ...
    ("title", pa.string()),
    ("author", pa.string()),
    ("permalink", pa.string()),        # absolute https://www.reddit.com/... URL
    ("url", pa.string()),
    ("domain", pa.string()),
    ("created_utc", TS),
    ("over_18", pa.bool_()),
    ("is_self", pa.bool_()),
    ("is_video", pa.bool_()),
    ("is_gallery", pa.bool_()),
    ("is_crosspost", pa.bool_()),
    ("removed_by_category", pa.string()),
    ("score", pa.int64()),
    ("num_comments", pa.int64()),
    ("fetched_at", TS),
    ("raw_json", pa.string()),         # the post's JSON as received (raw_json=1 form)
])

# One row per (source, run) of a listing fetch; gaps are data, not silence.
COVERAGE = pa.schema([
    ("source", pa.string()),
    ("interval_start", TS),
    ("fetched_at", TS),
    ("collector", pa.string()),        # "hourly" or "collector"
    ("pages", pa.int32()),
    ("requests", pa.int32()),
    ("posts_seen", pa.int32()),
    ("posts_kept", pa.int32()),
    ("oldest_seen", TS),
    ("newest_seen", TS),
    ("reached_boundary", pa.bool_()),  # paged back to older or already-stored posts
    ("gap", pa.bool_()),               # hit the listing cap before the boundary
    ("error", pa.string()),
])

# One row per image candidate: link resolution, pre-filters and download outcome.
CANDIDATES = pa.schema([
    ("candidate_id", pa.string()),     # "<post_id>:<position>"
    ("post_id", pa.string()),
    ("subreddit", pa.string()),
    ("position", pa.int32()),          # gallery order, 0 for single images
    ("kind", pa.string()),             # ireddit, direct, gallery, crosspost, imgur, imgur_album, flickr, preview
    ("url", pa.string()),
    ("known_width", pa.int32()),
    ("known_height", pa.int32()),
    ("status", pa.string()),           # downloaded | skipped:<why> | failed:<why>
    ("sha256", pa.string()),
    ("path", pa.string()),             # relative to MINING_HOME
    ("format", pa.string()),           # JPEG, PNG, WEBP, ...
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bytes", pa.int64()),
    ("http_status", pa.int32()),
    ("elapsed_s", pa.float64()),
    ("interval_start", TS),
])


def embeddings_schema() -> pa.Schema:
    """One row per distinct image (sha256) embedded in the interval."""
    return pa.schema([
        ("sha256", pa.string()),
        ("model", pa.string()),        # "<name>@<version>"
        ("dim", pa.int32()),
        ("embedding", pa.list_(pa.float32())),
        ("interval_start", TS),
    ])


EMBEDDINGS = embeddings_schema()

# One row per candidate with its final decision and the reason naming stage, score, threshold.
SCORES = pa.schema([
    ("candidate_id", pa.string()),
    ("post_id", pa.string()),
    ("sha256", pa.string()),
    ("novelty_model", pa.string()),    # version id of the novelty model
    ("novelty_score", pa.float64()),
    ("novelty_threshold", pa.float64()),
    ("watermark_model", pa.string()),
    ("watermark_prob", pa.float64()),
    ("watermark_threshold", pa.float64()),
    ("phash", pa.string()),            # hex
    ("duplicate_of", pa.string()),     # sha256 of the gallery/batch image it duplicates
    ("hamming", pa.int32()),
    ("decision", pa.string()),         # accepted | rejected | duplicate | failed
    ("stage", pa.string()),            # prefilter | download | embed | novelty | watermark | dedupe
    ("reason", pa.string()),
    ("scored_at", TS),
    ("interval_start", TS),
])

DECISIONS = ("accepted", "rejected", "duplicate", "failed")
