-- 002: the documented, stable views (docs/warehouse.md). Change them only in a new migration.

-- The hourly pipeline's decision for each candidate (origin 'score': what drove publishing).
CREATE OR REPLACE VIEW decisions AS
SELECT candidate_id, post_id, sha256, decision, stage, reason,
       novelty_model, novelty_score, novelty_threshold,
       watermark_model, watermark_prob, watermark_threshold,
       phash, duplicate_of, hamming, scored_at, interval_start
FROM scores
WHERE origin = 'score';

-- Every candidate with its decision; candidates the score step has not seen yet get one derived
-- from their download status, the same way the cascade's first stage would decide it.
CREATE OR REPLACE VIEW candidate_decisions AS
SELECT c.candidate_id, c.post_id, c.subreddit, c.position, c.kind, c.url, c.status, c.sha256,
       c.interval_start,
       coalesce(d.decision,
                CASE WHEN c.status LIKE 'failed%' THEN 'failed'
                     WHEN c.status LIKE 'skipped:already_downloaded%' THEN 'duplicate'
                     WHEN c.status LIKE 'skipped%' THEN 'rejected'
                     ELSE 'pending' END) AS decision,
       coalesce(d.stage,
                CASE WHEN c.status LIKE 'failed%' THEN 'download'
                     WHEN c.status LIKE 'skipped%' THEN 'prefilter'
                     ELSE 'pending' END) AS stage,
       coalesce(d.reason,
                CASE WHEN c.status LIKE 'failed%' THEN 'download: ' || coalesce(nullif(split_part(c.status, ':', 2), ''), 'unknown')
                     WHEN c.status LIKE 'skipped%' THEN 'prefilter: ' || coalesce(nullif(split_part(c.status, ':', 2), ''), 'unknown')
                     ELSE 'pending: downloaded, not scored yet' END) AS reason,
       d.novelty_model, d.novelty_score, d.novelty_threshold,
       d.watermark_model, d.watermark_prob, d.watermark_threshold,
       d.duplicate_of, d.hamming, d.scored_at
FROM candidates c
LEFT JOIN decisions d ON d.candidate_id = c.candidate_id;

-- Successful publications per candidate (several targets are joined with ', ').
CREATE OR REPLACE VIEW published AS
SELECT candidate_id, string_agg(coalesce(location, target), ', ' ORDER BY target) AS published_to,
       min(published_at) AS published_at
FROM publications
WHERE status = 'published' AND candidate_id IS NOT NULL
GROUP BY candidate_id;

-- The headline view: one row per image candidate (columns are a stable contract).
CREATE OR REPLACE VIEW mined_images AS
SELECT cd.post_id, cd.subreddit, p.title, p.permalink, cd.url AS image_url, cd.sha256,
       cd.decision, cd.reason, cd.novelty_score, cd.novelty_threshold, cd.watermark_prob,
       cd.novelty_model AS model_version, cd.interval_start, pub.published_to
FROM candidate_decisions cd
LEFT JOIN posts p ON p.post_id = cd.post_id
LEFT JOIN published pub ON pub.candidate_id = cd.candidate_id;

-- Per subreddit: how much it yields. acceptance_rate = accepted / decided candidates (not pending).
CREATE OR REPLACE VIEW acceptance_by_subreddit AS
WITH c AS (
    SELECT subreddit,
           count(*) AS candidates,
           count(*) FILTER (WHERE decision = 'accepted') AS accepted,
           count(*) FILTER (WHERE decision = 'rejected') AS rejected,
           count(*) FILTER (WHERE decision = 'duplicate') AS duplicate,
           count(*) FILTER (WHERE decision = 'failed') AS failed,
           count(*) FILTER (WHERE decision = 'pending') AS pending,
           count(*) FILTER (WHERE decision = 'rejected' AND stage = 'novelty') AS rejected_novelty,
           count(*) FILTER (WHERE decision = 'rejected' AND stage = 'watermark') AS rejected_watermark,
           count(*) FILTER (WHERE decision = 'rejected' AND stage = 'prefilter') AS rejected_prefilter,
           min(interval_start) AS first_interval,
           max(interval_start) AS last_interval
    FROM candidate_decisions
    GROUP BY subreddit
), p AS (
    SELECT subreddit, count(*) AS posts FROM posts GROUP BY subreddit
)
SELECT coalesce(c.subreddit, p.subreddit) AS subreddit,
       coalesce(p.posts, 0) AS posts,
       coalesce(c.candidates, 0) AS candidates,
       coalesce(c.accepted, 0) AS accepted,
       coalesce(c.rejected, 0) AS rejected,
       coalesce(c.duplicate, 0) AS duplicate,
       coalesce(c.failed, 0) AS failed,
       coalesce(c.pending, 0) AS pending,
       coalesce(c.rejected_novelty, 0) AS rejected_novelty,
       coalesce(c.rejected_watermark, 0) AS rejected_watermark,
       coalesce(c.rejected_prefilter, 0) AS rejected_prefilter,
       round(c.accepted / nullif(c.candidates - c.pending, 0), 4) AS acceptance_rate,
       c.first_interval, c.last_interval
FROM c FULL OUTER JOIN p ON p.subreddit = c.subreddit;

-- The newest opinion about each candidate (rescores included): the most recently scored row.
CREATE OR REPLACE VIEW latest_scores AS
SELECT *
FROM scores
QUALIFY row_number() OVER (PARTITION BY candidate_id ORDER BY scored_at DESC, novelty_model DESC) = 1;

-- Scores by the currently active novelty model (rows exist once the model scored or rescored them).
CREATE OR REPLACE VIEW active_scores AS
SELECT s.*
FROM scores s
JOIN model_versions m ON m.version = s.novelty_model AND m.kind = 'novelty' AND m.active;

-- Distribution of novelty scores per model version (only candidates that reached the novelty stage).
CREATE OR REPLACE VIEW score_distribution AS
SELECT novelty_model AS model_version,
       count(*) AS scored,
       min(novelty_score) AS min,
       quantile_cont(novelty_score, 0.05) AS p05,
       quantile_cont(novelty_score, 0.25) AS p25,
       quantile_cont(novelty_score, 0.50) AS median,
       quantile_cont(novelty_score, 0.75) AS p75,
       quantile_cont(novelty_score, 0.95) AS p95,
       max(novelty_score) AS max,
       avg(novelty_score) AS mean,
       max(novelty_threshold) AS threshold,
       round(avg(CASE WHEN novelty_score >= novelty_threshold THEN 1 ELSE 0 END), 4) AS share_above_threshold,
       min(interval_start) AS first_interval,
       max(interval_start) AS last_interval
FROM scores
WHERE novelty_score IS NOT NULL
GROUP BY novelty_model;

-- What a rescore would have decided differently from the pipeline's decision.
CREATE OR REPLACE VIEW rescore_changes AS
SELECT d.candidate_id, d.post_id, d.sha256, d.interval_start,
       d.novelty_model AS old_model, d.decision AS old_decision, d.novelty_score AS old_score,
       r.novelty_model AS new_model, r.decision AS new_decision, r.novelty_score AS new_score,
       r.reason AS new_reason
FROM decisions d
JOIN scores r ON r.candidate_id = d.candidate_id AND r.origin = 'rescore' AND r.novelty_model <> d.novelty_model
WHERE r.decision IS DISTINCT FROM d.decision;

-- Decisions per hour: the hourly DAG's yield over time.
CREATE OR REPLACE VIEW hourly_decisions AS
SELECT interval_start,
       count(*) AS candidates,
       count(*) FILTER (WHERE decision = 'accepted') AS accepted,
       count(*) FILTER (WHERE decision = 'rejected') AS rejected,
       count(*) FILTER (WHERE decision = 'duplicate') AS duplicate,
       count(*) FILTER (WHERE decision = 'failed') AS failed,
       count(*) FILTER (WHERE decision = 'pending') AS pending
FROM candidate_decisions
GROUP BY interval_start;

-- The active version of each model kind.
CREATE OR REPLACE VIEW active_models AS
SELECT kind, version, threshold, train_size, params, metrics, created_at, activated_at
FROM model_versions
WHERE active;
