"""The Reddit client against a real local Reddit-compatible server (mining.replay)."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from mining.devserver import DevServer, Response
from mining.reddit import RedditClient, RedditError, RequestBudget, unescape_post
from mining.replay import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    RedditReplay,
    fault_5xx,
    fault_429,
    fault_malformed,
    load_recorded_listing,
    make_post,
)
from mining.settings import Secret, Settings

T0 = 1_700_000_000.0


@pytest.fixture
def posts() -> list[dict]:
    return [make_post(f"p{i:02d}", T0 + i * 60, "pics") for i in range(30)]


@pytest.fixture
def oauth_settings(settings: Settings) -> Settings:
    return settings.replace(reddit_client_id=DEFAULT_CLIENT_ID, reddit_client_secret=Secret(DEFAULT_CLIENT_SECRET),
                            requests_per_minute=1000)


@pytest.fixture
def replay(dev_server: DevServer, posts: list[dict]) -> RedditReplay:
    return RedditReplay(dev_server, {"pics": posts})


def test_oauth_listing_sends_token_raw_json_and_user_agent(oauth_settings: Settings, replay: RedditReplay,
                                                           dev_server: DevServer) -> None:
    page = RedditClient(oauth_settings).listing("pics", limit=10)
    assert [p["id"] for p in page["posts"]] == [f"p{i:02d}" for i in range(29, 19, -1)]
    assert page["after"] == "t3_p20"
    token_req, listing_req = dev_server.log
    assert token_req.path == "/api/v1/access_token" and token_req.method == "POST"
    assert listing_req.path == "/r/pics/new"
    assert listing_req.query["raw_json"] == "1" and listing_req.query["limit"] == "10"
    assert listing_req.headers["authorization"].startswith("bearer replay-token-")
    assert listing_req.headers["user-agent"] == oauth_settings.user_agent
    assert "mining" in oauth_settings.user_agent and "Mozilla" not in oauth_settings.user_agent


def test_anonymous_mode_uses_json_paths_and_no_token(settings: Settings, dev_server: DevServer,
                                                     posts: list[dict]) -> None:
    replay = RedditReplay(dev_server, {"pics": posts}, oauth=False)
    client = RedditClient(settings)
    assert not settings.oauth and settings.budget_per_minute == 10
    page = client.listing("pics", limit=5)
    page2 = client.listing("pics", after=page["after"], limit=5)
    assert [p["id"] for p in page2["posts"]] == ["p24", "p23", "p22", "p21", "p20"]
    assert [r.path for r in dev_server.log] == ["/r/pics/new.json", "/r/pics/new.json"]
    assert dev_server.log[1].query["after"] == "t3_p25"
    assert all("authorization" not in r.headers for r in dev_server.log)
    assert replay.token_requests == 0


def test_token_cached_on_disk_with_0600_and_reused(oauth_settings: Settings, replay: RedditReplay) -> None:
    RedditClient(oauth_settings).listing("pics")
    path = oauth_settings.state_dir / "reddit_token.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DEFAULT_CLIENT_SECRET not in path.read_text()
    RedditClient(oauth_settings).listing("pics")  # a new process would read the same file
    assert replay.tokens_issued == 1


def test_token_renewed_before_expiry(oauth_settings: Settings, dev_server: DevServer, posts: list[dict],
                                     virtual_clock) -> None:
    replay = RedditReplay(dev_server, {"pics": posts}, token_ttl_s=100)
    client = RedditClient(oauth_settings)
    client.listing("pics")
    virtual_clock.sleep(80)
    client.listing("pics")
    assert replay.tokens_issued == 1
    virtual_clock.sleep(15)  # 95 s: inside the renewal margin, before the server's expiry
    client.listing("pics")
    assert replay.tokens_issued == 2


def test_401_drops_token_renews_and_retries(oauth_settings: Settings, replay: RedditReplay,
                                            dev_server: DevServer) -> None:
    client = RedditClient(oauth_settings)
    client.listing("pics")
    replay.expire_tokens()
    page = client.listing("pics")
    assert len(page["posts"]) == 30
    assert replay.tokens_issued == 2
    assert [r.path for r in dev_server.log].count("/r/pics/new") == 3


def test_bad_credentials_fail_clearly_without_the_secret(oauth_settings: Settings, replay: RedditReplay,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    planted = "planted-S3cret-xyz"
    bad = oauth_settings.replace(reddit_client_secret=Secret(planted))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RedditError, match="refused the client credentials") as info:
        RedditClient(bad).listing("pics")
    assert info.value.status == 401
    for text in (str(info.value), repr(info.value), caplog.text, repr(bad)):
        assert planted not in text
    assert not (bad.state_dir / "reddit_token.json").exists()


def test_429_waits_retry_after(oauth_settings: Settings, replay: RedditReplay, dev_server: DevServer,
                               virtual_clock) -> None:
    replay.inject(fault_429(retry_after=7))
    page = RedditClient(oauth_settings).listing("pics")
    assert len(page["posts"]) == 30
    assert 7.0 in virtual_clock.sleeps
    assert [r.path for r in dev_server.log].count("/r/pics/new") == 2


def test_burst_of_500s_backs_off_exponentially(oauth_settings: Settings, replay: RedditReplay,
                                               virtual_clock) -> None:
    replay.inject(fault_5xx(500), fault_5xx(502), fault_5xx(503))
    page = RedditClient(oauth_settings).listing("pics")
    assert len(page["posts"]) == 30
    waits = virtual_clock.sleeps
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):  # 1, 2, 4 s with jitter in [50%, 100%]
        assert 0.5 * 2**attempt <= wait <= 2**attempt


def test_retries_exhausted_raise_reddit_error(oauth_settings: Settings, replay: RedditReplay,
                                              dev_server: DevServer) -> None:
    replay.inject(*[fault_5xx(500)] * 5)
    with pytest.raises(RedditError, match=r"HTTP 500; gave up after 3 attempts"):
        RedditClient(oauth_settings.replace(max_retries=2)).listing("pics")
    assert [r.path for r in dev_server.log].count("/r/pics/new") == 3


def test_malformed_json_is_retried_then_named(oauth_settings: Settings, replay: RedditReplay) -> None:
    replay.inject(fault_malformed())
    assert len(RedditClient(oauth_settings).listing("pics")["posts"]) == 30
    replay.inject(*[fault_malformed()] * 3)
    with pytest.raises(RedditError, match="malformed JSON from GET /r/pics/new"):
        RedditClient(oauth_settings.replace(max_retries=2)).listing("pics")


def test_not_found_is_not_retried(oauth_settings: Settings, replay: RedditReplay, dev_server: DevServer) -> None:
    replay.inject(Response(403, b'{"reason": "private"}', {"Content-Type": "application/json"}))
    with pytest.raises(RedditError, match="HTTP 403"):
        RedditClient(oauth_settings).listing("pics")
    assert [r.path for r in dev_server.log].count("/r/pics/new") == 1


def test_timeout_is_retried(oauth_settings: Settings, replay: RedditReplay, virtual_clock) -> None:
    body = json.dumps({"kind": "Listing", "data": {"after": None, "children": []}}).encode()
    replay.inject(Response(200, body, {"Content-Type": "application/json"}, delay_s=1.0))
    client = RedditClient(oauth_settings.replace(request_timeout_s=0.2))
    assert len(client.listing("pics")["posts"]) == 30
    assert len(virtual_clock.sleeps) == 1


def _max_in_any_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    return max(sum(1 for u in times if t <= u <= t + window) for t in times)


def test_budget_never_exceeded_in_any_60s_window(settings: Settings, dev_server: DevServer, posts: list[dict],
                                                 virtual_clock) -> None:
    RedditReplay(dev_server, {"pics": posts}, oauth=False)
    client = RedditClient(settings.replace(requests_per_minute=5))
    for _ in range(17):
        client.listing("pics", limit=5)
    times = [r.at for r in dev_server.log]
    assert len(times) == 17
    assert _max_in_any_window(times) <= 5
    assert sum(virtual_clock.sleeps) >= 3 * 60  # 17 requests at 5/min must span > 3 minutes
    assert times[-1] - times[0] >= 180


def test_budget_is_shared_between_clients_of_one_home(settings: Settings, dev_server: DevServer,
                                                      posts: list[dict]) -> None:
    RedditReplay(dev_server, {"pics": posts}, oauth=False)
    limited = settings.replace(requests_per_minute=4)
    a, b = RedditClient(limited), RedditClient(limited)  # e.g. the hourly scrape and the collector
    for _ in range(6):
        a.listing("pics", limit=1)
        b.listing("pics", limit=1)
    assert _max_in_any_window([r.at for r in dev_server.log]) <= 4


def test_ratelimit_headers_pause_until_reset(oauth_settings: Settings, dev_server: DevServer, posts: list[dict],
                                             virtual_clock) -> None:
    replay = RedditReplay(dev_server, {"pics": posts}, ratelimit_budget=3, ratelimit_window_s=600)
    client = RedditClient(oauth_settings)
    for _ in range(5):
        client.listing("pics", limit=1)
    assert replay.throttled == 0  # the client waited for the reset instead of getting 429s
    assert any(w > 1 for w in virtual_clock.sleeps)
    listing_times = [r.at for r in dev_server.log if r.path == "/r/pics/new"]
    assert listing_times[3] // 600 != listing_times[2] // 600  # the 4th went out in a new window


def test_request_budget_rejects_zero() -> None:
    with pytest.raises(ValueError):
        RequestBudget(0)


def test_unescape_post_touches_only_url_fields() -> None:
    post = {
        "title": "Fish &amp; chips",
        "url": "https://example.com/a?x=1&amp;y=2",
        "preview": {"images": [{"source": {"url": "https://preview.redd.it/a.jpg?width=1&amp;s=abc"}}]},
        "media_metadata": {"m1": {"s": {"u": "https://preview.redd.it/m1.jpg?a=1&amp;b=2"}}},
        "crosspost_parent_list": [{"url": "https://i.redd.it/x.jpg?a=1&amp;b=2", "title": "A &amp; B"}],
    }
    out = unescape_post(post)
    assert out["url"] == "https://example.com/a?x=1&y=2"
    assert out["preview"]["images"][0]["source"]["url"].endswith("width=1&s=abc")
    assert out["media_metadata"]["m1"]["s"]["u"].endswith("a=1&b=2")
    assert out["crosspost_parent_list"][0]["url"].endswith("a=1&b=2")
    assert out["title"] == "Fish &amp; chips" and out["crosspost_parent_list"][0]["title"] == "A &amp; B"
    assert post["url"].endswith("&amp;y=2")  # the input is not mutated


@pytest.mark.shared
def test_recorded_escaped_gallery_urls_come_back_unescaped(oauth_settings: Settings, dev_server: DevServer,
                                                           shared_reddit: Path) -> None:
    gallery = load_recorded_listing(shared_reddit / "post_gallery_2023.json")
    assert "&amp;" in json.dumps(gallery[0]["media_metadata"])  # recorded without raw_json=1
    RedditReplay(dev_server, {"crafts": gallery})
    (post,) = RedditClient(oauth_settings).listing("crafts")["posts"]
    urls = [m["s"]["u"] for m in post["media_metadata"].values() if m.get("status") == "valid"]
    assert len(urls) == 5
    assert all("&amp;" not in u and "&" in u for u in urls)
    assert "&amp;" not in json.dumps(post.get("preview", {}))
