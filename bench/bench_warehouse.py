"""Warehouse benchmark: a million-candidate warehouse answering the README's questions.

Builds a synthetic but realistic lake (default: 30 days of hourly partitions, ~300k posts from
a Zipf-distributed set of subreddits, 1M image candidates, pipeline scores for every candidate
and a rescore by a second model version, small embeddings), loads it day by day with the real
loader, then times each example query of docs/warehouse.md on the warehouse, beside the same
question asked of the lake's Parquet files directly (the baseline a warehouse must beat).

    .venv/bin/python bench/bench_warehouse.py                 # 1M candidates (a few minutes)
    .venv/bin/python bench/bench_warehouse.py --candidates 100000 --keep /tmp/wh-bench

Prints a Markdown table to paste in the README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mining import schemas  # noqa: E402
from mining.lake import Interval, atomic_write_table, write_partition  # noqa: E402
from mining.settings import load_settings  # noqa: E402
from mining.warehouse import Warehouse, load_interval, rescore, rescore_path  # noqa: E402

START = datetime(2026, 10, 1, tzinfo=UTC)
STATUSES = np.array(["downloaded", "failed:http_404", "failed:timeout", "skipped:too_small", "skipped:nsfw",
                     "skipped:already_downloaded"])
STATUS_P = [0.75, 0.06, 0.03, 0.1, 0.03, 0.03]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sha_of(ids: np.ndarray, salt: str) -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in ids.tolist()]


def build_lake(settings, hours: int, candidates: int, dim: int, seed: int = 0) -> dict[str, int]:
    """Write posts, coverage, candidates, embeddings, scores (v1) and rescores (v2) partitions."""
    rng = np.random.default_rng(seed)
    n_subs = 2000
    subs = np.array([f"sub{i:04d}" for i in range(n_subs)])
    zipf = 1.0 / np.arange(1, n_subs + 1) ** 1.1
    zipf /= zipf.sum()
    per_hour = candidates // hours
    totals = {"posts": 0, "candidates": 0, "embeddings": 0, "scores": 0, "rescores": 0}
    cand_seq = 0
    for h in range(hours):
        hour = Interval(START + timedelta(hours=h), START + timedelta(hours=h + 1))
        t0 = hour.start
        # ~3.3 candidates per post on average: most posts single images, some galleries.
        sizes = rng.choice([1, 1, 1, 1, 1, 2, 2, 3, 5, 16], size=per_hour)
        cum = np.cumsum(sizes)
        n_posts = int(np.searchsorted(cum, per_hour)) + 1
        sizes = sizes[:n_posts]
        sizes[-1] -= int(cum[n_posts - 1] - per_hour)
        sizes = sizes[sizes > 0]
        n_posts = len(sizes)
        post_ids = np.array([f"{h:04d}{i:05d}" for i in range(n_posts)])
        post_sub = rng.choice(subs, size=n_posts, p=zipf)
        created = [t0 + timedelta(seconds=int(s)) for s in rng.integers(0, 3600, n_posts)]
        titles = [f"Morning light over the ridge, {i} [OC] [4000x3000]" for i in range(n_posts)]
        posts = pa.table({
            "post_id": post_ids, "subreddit": post_sub, "source": np.where(rng.random(n_posts) < 0.7, "all", post_sub),
            "title": titles, "author": [f"user{i % 5000}" for i in range(n_posts)],
            "permalink": [f"https://www.reddit.com/r/{s}/comments/{p}/t/" for s, p in zip(post_sub, post_ids, strict=True)],
            "url": [f"https://www.reddit.com/gallery/{p}" for p in post_ids], "domain": ["i.redd.it"] * n_posts,
            "created_utc": created, "over_18": np.zeros(n_posts, bool), "is_self": np.zeros(n_posts, bool),
            "is_video": np.zeros(n_posts, bool), "is_gallery": sizes > 1, "is_crosspost": rng.random(n_posts) < 0.05,
            "removed_by_category": [None] * n_posts, "score": rng.integers(1, 50000, n_posts),
            "num_comments": rng.integers(0, 2000, n_posts), "fetched_at": [t0 + timedelta(minutes=61)] * n_posts,
            "raw_json": [json.dumps({"id": p, "subreddit": s}) for p, s in zip(post_ids, post_sub, strict=True)],
        }, schema=schemas.POSTS)
        post_of = np.repeat(np.arange(n_posts), sizes)
        position = np.concatenate([np.arange(s) for s in sizes]).astype(np.int32)
        n = len(post_of)
        cids = [f"{post_ids[p]}:{q}" for p, q in zip(post_of.tolist(), position.tolist(), strict=True)]
        status = rng.choice(STATUSES, size=n, p=STATUS_P)
        ok = status == "downloaded"
        shas = np.array(sha_of(np.arange(cand_seq, cand_seq + n), "img"), dtype=object)
        cand_seq += n
        shas[~ok] = None
        paths = np.array([f"images/{s[:2]}/{s[2:4]}/{s}.jpg" if s else None for s in shas], dtype=object)
        cands = pa.table({
            "candidate_id": cids, "post_id": post_ids[post_of], "subreddit": post_sub[post_of], "position": position,
            "kind": np.where(sizes[post_of] > 1, "gallery", "ireddit"),
            "url": [f"https://i.redd.it/{c.replace(':', '_')}.jpg" for c in cids],
            "known_width": np.full(n, 4000, np.int32), "known_height": np.full(n, 3000, np.int32),
            "status": status, "sha256": shas, "path": paths, "format": np.where(ok, "JPEG", None),
            "width": pa.array(np.where(ok, 4000, 0).astype(np.int32), mask=~ok),
            "height": pa.array(np.where(ok, 3000, 0).astype(np.int32), mask=~ok),
            "bytes": pa.array(rng.integers(10**5, 10**7, n), mask=~ok),
            "http_status": np.where(status == "failed:http_404", 404, 200).astype(np.int32),
            "elapsed_s": rng.random(n), "interval_start": [t0] * n,
        }, schema=schemas.CANDIDATES)
        emb_idx = np.flatnonzero(ok)
        vecs = rng.normal(size=(len(emb_idx), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        embs = pa.table({
            "sha256": shas[emb_idx], "model": ["efficientnet-lite0@1"] * len(emb_idx),
            "dim": np.full(len(emb_idx), dim, np.int32),
            "embedding": pa.FixedSizeListArray.from_arrays(vecs.reshape(-1), dim).cast(pa.list_(pa.float32())),
            "interval_start": [t0] * len(emb_idx),
        }, schema=schemas.EMBEDDINGS)
        # pipeline scores (model v1) for every candidate
        nov = np.full(n, np.nan)
        nov[emb_idx] = 0.35 + 0.12 * rng.standard_normal(len(emb_idx))
        wm = np.where(ok & (nov >= 0.4), rng.beta(1, 6, n), np.nan)
        decision = np.where(status == "downloaded", "accepted",
                            np.where(np.char.startswith(status.astype(str), "failed"), "failed",
                                     np.where(status == "skipped:already_downloaded", "duplicate", "rejected")))
        stage = np.where(decision == "failed", "download", np.where(ok, "accepted", "prefilter"))
        novelty_rej = ok & (nov < 0.4)
        wm_rej = ok & ~novelty_rej & (wm >= 0.5)
        dup = ok & ~novelty_rej & ~wm_rej & (rng.random(n) < 0.08)
        decision = np.where(novelty_rej | wm_rej, "rejected", np.where(dup, "duplicate", decision))
        stage = np.where(novelty_rej, "novelty", np.where(wm_rej, "watermark", np.where(dup, "dedupe", stage)))
        reason = [
            f"novelty: score {s:.4f} < threshold 0.4000 (model knn-v1)" if st == "novelty" else
            f"watermark: probability {w:.3f} >= threshold 0.500 (wm-v1)" if st == "watermark" else
            "dedupe: perceptual hash within 4 <= 10 bits of the gallery" if st == "dedupe" else
            f"accepted: novelty {s:.4f} >= 0.4000, watermark {w:.3f} < 0.500" if d == "accepted" else
            f"{st}: {stt.split(':', 1)[1]}"
            for s, w, st, d, stt in zip(nov.tolist(), wm.tolist(), stage.tolist(), decision.tolist(), status.tolist(),
                                        strict=True)]
        scored_at = t0 + timedelta(hours=1, minutes=5)
        nov_m = np.isnan(nov)
        wm_m = np.isnan(wm)
        scores = pa.table({
            "candidate_id": cids, "post_id": post_ids[post_of], "sha256": shas, "novelty_model": ["knn-v1"] * n,
            "novelty_score": pa.array(np.nan_to_num(nov), mask=nov_m),
            "novelty_threshold": pa.array(np.full(n, 0.4), mask=nov_m),
            "watermark_model": pa.array(np.full(n, "wm-v1", dtype=object), mask=wm_m),
            "watermark_prob": pa.array(np.nan_to_num(wm), mask=wm_m),
            "watermark_threshold": pa.array(np.full(n, 0.5), mask=wm_m),
            "phash": [None] * n, "duplicate_of": pa.array(np.full(n, "f" * 64, dtype=object), mask=~dup),
            "hamming": pa.array(np.full(n, 4, np.int32), mask=~dup),
            "decision": decision, "stage": stage, "reason": reason, "scored_at": [scored_at] * n,
            "interval_start": [t0] * n,
        }, schema=schemas.SCORES)
        # a second model version's rescore of the candidates that reached the novelty stage
        r_nov = nov[emb_idx] + 0.05 * rng.standard_normal(len(emb_idx))
        r_dec = np.where(r_nov < 0.42, "rejected", "accepted")
        rescored = scores.take(pa.array(emb_idx)).to_pydict()
        rescored.update(novelty_model=["gmm-v2"] * len(emb_idx), novelty_score=r_nov.tolist(),
                        novelty_threshold=[0.42] * len(emb_idx), decision=r_dec.tolist(),
                        stage=np.where(r_dec == "rejected", "novelty", "accepted").tolist(),
                        reason=[f"rescore (model gmm-v2): novelty {s:.4f}" for s in r_nov.tolist()],
                        scored_at=[scored_at + timedelta(days=7)] * len(emb_idx))
        lake = settings.lake_dir
        write_partition(lake, "posts", hour, posts)
        write_partition(lake, "coverage", hour, pa.Table.from_pylist([dict(
            source="all", interval_start=t0, fetched_at=t0 + timedelta(minutes=61), collector="hourly", pages=10,
            requests=10, posts_seen=1000, posts_kept=n_posts, oldest_seen=t0, newest_seen=hour.end,
            reached_boundary=False, gap=True, error=None)], schemas.COVERAGE))
        write_partition(lake, "candidates", hour, cands)
        write_partition(lake, "embeddings", hour, embs)
        write_partition(lake, "scores", hour, scores)
        atomic_write_table(pa.Table.from_pydict(rescored, schemas.SCORES), rescore_path(settings, hour, "gmm-v2"))
        totals["posts"] += n_posts
        totals["candidates"] += n
        totals["embeddings"] += len(emb_idx)
        totals["scores"] += n
        totals["rescores"] += len(emb_idx)
    return totals


def queries_from_docs() -> list[tuple[str, str]]:
    """(question, sql) for each ```sql block of docs/warehouse.md; the question is the line before it."""
    parts = (ROOT / "docs" / "warehouse.md").read_text().split("```sql")
    out = []
    for i in range(1, len(parts)):
        before = [line for line in parts[i - 1].rsplit("```", 1)[-1].splitlines() if line.strip()]
        name = before[-1].strip().rstrip(":") if before else f"query {i}"
        out.append((name, parts[i].split("```")[0].strip().rstrip(";")))
    return out


LAKE_BASELINES = {
    "Acceptance rate per subreddit": """
        SELECT c.subreddit, count(*) AS candidates, count(*) FILTER (WHERE s.decision = 'accepted') AS accepted,
               accepted / count(*) AS acceptance_rate
        FROM read_parquet('{lake}/candidates/*/part.parquet') c
        LEFT JOIN read_parquet('{lake}/scores/*/part.parquet') s USING (candidate_id)
        GROUP BY ALL ORDER BY accepted DESC LIMIT 15""",
    "Why was this post rejected?": """
        SELECT c.post_id, c.url, s.decision, s.reason, s.novelty_score, s.novelty_threshold, s.watermark_prob
        FROM read_parquet('{lake}/candidates/*/part.parquet') c
        LEFT JOIN read_parquet('{lake}/scores/*/part.parquet') s USING (candidate_id)
        WHERE c.post_id = 'POST_ID'""",
    "Score distribution per model version (including rescores)": """
        SELECT novelty_model, count(*), quantile_cont(novelty_score, 0.05), median(novelty_score),
               quantile_cont(novelty_score, 0.95)
        FROM read_parquet(['{lake}/scores/*/part.parquet', '{lake}/rescores/*/*.parquet'])
        WHERE novelty_score IS NOT NULL GROUP BY ALL""",
}


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first run, median of the warm runs) in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:] or times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--hours", type=int, default=720)
    ap.add_argument("--dim", type=int, default=32, help="embedding width stored (small: the queries do not use it)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="build in this directory and keep it (default: a temp dir, removed)")
    args = ap.parse_args()

    home = args.keep or Path(tempfile.mkdtemp(prefix="mining-bench-wh-"))
    if home.exists() and any(home.iterdir()):
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    settings = load_settings(env={}, home=home)
    try:
        t = time.perf_counter()
        totals = build_lake(settings, args.hours, args.candidates, args.dim)
        gen_s = time.perf_counter() - t
        print(f"lake: {totals} in {gen_s:.1f} s", file=sys.stderr)

        t = time.perf_counter()
        days = args.hours // 24 or 1
        for d in range(days):
            span = Interval(START + timedelta(days=d), START + timedelta(days=d + 1) if args.hours >= 24
                            else START + timedelta(hours=args.hours))
            load_interval(settings, span)
        load_s = time.perf_counter() - t
        day = Interval(START, START + timedelta(days=1) if args.hours >= 24 else START + timedelta(hours=args.hours))
        t = time.perf_counter()
        load_interval(settings, day)
        reload_s = time.perf_counter() - t

        class StandIn:  # a linear scorer: rescoring cost without a model's own cost
            version, threshold = "linear-v3", 0.0
            w = np.random.default_rng(1).normal(size=args.dim).astype(np.float32)

            def score(self, X: np.ndarray) -> np.ndarray:
                return X @ self.w

        t = time.perf_counter()
        rescored = rescore(settings, day, model=StandIn()).counts.get("rescored", 0)
        rescore_s = time.perf_counter() - t

        with Warehouse.open(settings, read_only=True) as wh:
            counts = {tbl: wh.query(f"SELECT count(*) FROM {tbl}")[1][0][0]
                      for tbl in ("posts", "candidates", "scores", "embeddings", "images")}
            post_id = wh.query("SELECT post_id FROM decisions WHERE stage = 'novelty' LIMIT 1")[1][0][0]
            results = []
            for name, sql in queries_from_docs():
                q = sql.replace("'POST_ID'", f"'{post_id}'")
                first, warm = timed(lambda q=q: wh.query(q), args.repeat)
                results.append((name, first, warm))
        db_mb = settings.warehouse_path.stat().st_size / 2**20
        lake_mb = sum(p.stat().st_size for p in settings.lake_dir.rglob("*.parquet")) / 2**20

        lake_con = duckdb.connect()
        baseline = {}
        for name, sql in LAKE_BASELINES.items():
            q = sql.format(lake=settings.lake_dir).replace("'POST_ID'", f"'{post_id}'")
            baseline[name] = timed(lambda q=q: lake_con.execute(q).fetchall(), max(2, args.repeat // 2))
        lake_con.close()

        print(f"\nWarehouse benchmark: {counts['candidates']:,} candidates, {counts['posts']:,} posts, "
              f"{counts['scores']:,} score rows (2 model versions + a 1-day rescore), "
              f"{counts['embeddings']:,} embeddings ({args.dim}-d), {args.hours} hourly partitions; "
              f"`python bench/bench_warehouse.py --candidates {args.candidates}`\n")
        print("| README question (docs/warehouse.md) | warehouse first run (s) | warehouse warm (s) "
              "| same question on the lake Parquet (s) | speed-up |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, first, warm in results:
            base = next((v for k, v in baseline.items() if name.startswith(k)), None)
            b = f"{base[1]:.3f}" if base else "n/a"
            ratio = f"{base[1] / warm:.0f}x" if base else ""
            flag = "" if max(first, warm) < 1.0 else " (over 1 s)"
            print(f"| {name}{flag} | {first:.3f} | {warm:.3f} | {b} | {ratio} |")
        print()
        print("| measure | value |")
        print("| --- | ---: |")
        print(f"| synthetic lake written | {gen_s:.1f} s ({lake_mb:.0f} MiB Parquet) |")
        print(f"| load of all {days} days (one transaction per day) | {load_s:.1f} s "
              f"({counts['candidates'] / load_s:,.0f} candidates/s) |")
        print(f"| reload of one day (idempotent delete + insert) | {reload_s:.2f} s |")
        print(f"| rescore of one day ({rescored:,} candidates, linear stand-in model) | {rescore_s:.2f} s |")
        print(f"| warehouse.duckdb size | {db_mb:.0f} MiB |")
        print(f"| peak RSS of this process | {peak_rss_mb():.0f} MiB |")
        slow = [n for n, f, w in results if max(f, w) >= 1.0]
        print(f"\n{'All' if not slow else 'NOT all'} example queries under 1 s"
              + (f" (slow: {', '.join(slow)})" if slow else "") + ".")
        return 1 if slow else 0
    finally:
        if args.keep is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
