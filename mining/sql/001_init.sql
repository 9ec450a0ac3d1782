-- 001: tables loaded from the lake, and the small state that must be transactional.
-- All timestamps are UTC, stored as TIMESTAMP (naive) so every client reads them without a tz library.

-- ---- loaded from the lake (delete-then-insert per interval; interval_start = partition hour) ----
CREATE TABLE posts (
    post_id VARCHAR NOT NULL,
    subreddit VARCHAR,
    source VARCHAR,
    title VARCHAR,
    author VARCHAR,
    permalink VARCHAR,
    url VARCHAR,
    domain VARCHAR,
    created_utc TIMESTAMP,
    over_18 BOOLEAN,
    is_self BOOLEAN,
    is_video BOOLEAN,
    is_gallery BOOLEAN,
    is_crosspost BOOLEAN,
    removed_by_category VARCHAR,
    score BIGINT,
    num_comments BIGINT,
    fetched_at TIMESTAMP,
    interval_start TIMESTAMP NOT NULL
);

CREATE TABLE coverage (
    source VARCHAR,
    interval_start TIMESTAMP NOT NULL,
    fetched_at TIMESTAMP,
    collector VARCHAR,
    pages INTEGER,
    requests INTEGER,
    posts_seen INTEGER,
    posts_kept INTEGER,
    oldest_seen TIMESTAMP,
    newest_seen TIMESTAMP,
    reached_boundary BOOLEAN,
    gap BOOLEAN,
    error VARCHAR
);

CREATE TABLE candidates (
    candidate_id VARCHAR NOT NULL,
    post_id VARCHAR NOT NULL,
    subreddit VARCHAR,
    position INTEGER,
    kind VARCHAR,
    url VARCHAR,
    known_width INTEGER,
    known_height INTEGER,
    status VARCHAR,
    sha256 VARCHAR,
    path VARCHAR,
    format VARCHAR,
    width INTEGER,
    height INTEGER,
    bytes BIGINT,
    http_status INTEGER,
    elapsed_s DOUBLE,
    interval_start TIMESTAMP NOT NULL
);

CREATE TABLE embeddings (
    sha256 VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    dim INTEGER,
    embedding FLOAT[],
    interval_start TIMESTAMP NOT NULL
);

-- One row per (candidate_id, novelty_model). origin 'score' rows come from the hourly score
-- step (exactly one per candidate: the decision that drove publishing); origin 'rescore' rows
-- come from `mining rescore` with later model versions and sit beside them.
CREATE TABLE scores (
    candidate_id VARCHAR NOT NULL,
    post_id VARCHAR,
    sha256 VARCHAR,
    novelty_model VARCHAR,
    novelty_score DOUBLE,
    novelty_threshold DOUBLE,
    watermark_model VARCHAR,
    watermark_prob DOUBLE,
    watermark_threshold DOUBLE,
    phash VARCHAR,
    duplicate_of VARCHAR,
    hamming INTEGER,
    decision VARCHAR,
    stage VARCHAR,
    reason VARCHAR,
    scored_at TIMESTAMP,
    interval_start TIMESTAMP NOT NULL,
    origin VARCHAR NOT NULL DEFAULT 'score' CHECK (origin IN ('score', 'rescore'))
);

-- Distinct downloaded images (content addressed); first_seen = earliest interval it appeared in.
CREATE TABLE images (
    sha256 VARCHAR PRIMARY KEY,
    path VARCHAR,
    format VARCHAR,
    width INTEGER,
    height INTEGER,
    bytes BIGINT,
    first_seen TIMESTAMP
);

-- ---- transactional state ----
CREATE TABLE gallery (
    sha256 VARCHAR PRIMARY KEY,
    path VARCHAR,
    phash VARCHAR,
    phash_mirror VARCHAR,
    embedding FLOAT[],
    embed_model VARCHAR,
    source VARCHAR NOT NULL CHECK (source IN ('liked', 'published')),
    added_at TIMESTAMP NOT NULL,
    post_id VARCHAR,
    candidate_id VARCHAR
);

CREATE TABLE publications (
    sha256 VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    status VARCHAR NOT NULL,          -- published | failed | duplicate (publisher outcome)
    location VARCHAR,
    attempts INTEGER NOT NULL DEFAULT 1,
    error VARCHAR,
    published_at TIMESTAMP,
    candidate_id VARCHAR,
    updated_at TIMESTAMP,
    PRIMARY KEY (sha256, target)
);

CREATE TABLE model_versions (
    version VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL CHECK (kind IN ('novelty', 'watermark', 'embedder')),
    params JSON,
    train_size BIGINT,
    metrics JSON,
    threshold DOUBLE,
    created_at TIMESTAMP,
    active BOOLEAN NOT NULL DEFAULT false,
    activated_at TIMESTAMP
);

CREATE TABLE runs (
    run_id VARCHAR NOT NULL,
    dag_id VARCHAR,
    step VARCHAR NOT NULL,
    interval_start TIMESTAMP,
    interval_end TIMESTAMP,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    status VARCHAR,
    counts JSON,
    durations JSON,
    rejection_reasons JSON,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE watch_list (
    subreddit VARCHAR PRIMARY KEY,
    added_at TIMESTAMP NOT NULL,
    added_by VARCHAR NOT NULL CHECK (added_by IN ('user', 'discovery')),
    active BOOLEAN NOT NULL DEFAULT true,
    note VARCHAR
);
