"""The Reddit-compatible replay server, spoken to with plain HTTP (what Reddit itself would answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from mining.devserver import DevServer
from mining.replay import (
    RedditReplay,
    escape_post,
    fault_5xx,
    fault_429,
    fault_malformed,
    load_recorded_listing,
    make_post,
)

T0 = 1_700_000_000.0


@pytest.fixture
def anon(dev_server: DevServer) -> RedditReplay:
    posts = [make_post(f"p{i:02d}", T0 + i, "pics") for i in range(40)]
    return RedditReplay(dev_server, {"pics": posts}, oauth=False, depth_cap=30)


def _get(url: str, **params: object) -> requests.Response:
    return requests.get(url, params=params, timeout=5)


def _ids(resp: requests.Response) -> list[str]:
    return [c["data"]["id"] for c in resp.json()["data"]["children"]]


def test_listing_is_newest_first_with_after_before_and_depth_cap(anon: RedditReplay) -> None:
    base = f"{anon.url}/r/pics/new.json"
    first = _get(base, limit=10, raw_json=1)
    body = first.json()
    assert body["kind"] == "Listing" and body["data"]["children"][0]["kind"] == "t3"
    assert _ids(first) == [f"p{i:02d}" for i in range(39, 29, -1)]
    assert body["data"]["after"] == "t3_p30" and body["data"]["before"] is None
    second = _get(base, limit=10, after="t3_p30", raw_json=1)
    assert _ids(second)[0] == "p29" and second.json()["data"]["before"] == "t3_p29"
    back = _get(base, limit=5, before="t3_p29", raw_json=1)
    assert _ids(back) == ["p34", "p33", "p32", "p31", "p30"]
    last = _get(base, limit=10, after="t3_p20", raw_json=1)  # items 21..30 of a 30-deep listing
    assert len(_ids(last)) == 10 and last.json()["data"]["after"] is None
    assert _ids(_get(base, limit=10, after="t3_p10", raw_json=1)) == []  # beyond the cap
    assert len(_ids(_get(base, limit=500, raw_json=1))) == 30  # limit clamps to 100, cap to 30
    assert _ids(_get(f"{anon.url}/r/nosuchsub/new.json")) == []
    assert _get(f"{anon.url}/r/pics/hot.json").status_code == 404


def test_urls_escaped_unless_raw_json(dev_server: DevServer) -> None:
    post = make_post("g1", T0, preview={"images": [{"source": {"url": "https://preview.redd.it/g1.jpg?w=1&s=x"}}]},
                     url="https://example.com/img.jpg?a=1&b=2", title="Fish & chips")
    replay = RedditReplay(dev_server, {"pics": [post]}, oauth=False)
    raw = _get(f"{replay.url}/r/pics/new.json", raw_json=1).json()["data"]["children"][0]["data"]
    escaped = _get(f"{replay.url}/r/pics/new.json").json()["data"]["children"][0]["data"]
    assert raw["url"] == "https://example.com/img.jpg?a=1&b=2"
    assert escaped["url"] == "https://example.com/img.jpg?a=1&amp;b=2"
    assert escaped["preview"]["images"][0]["source"]["url"].endswith("w=1&amp;s=x")
    assert escape_post(post)["title"] == "Fish & chips"


def test_token_endpoint_checks_basic_auth_and_counts(dev_server: DevServer) -> None:
    replay = RedditReplay(dev_server, {"pics": [make_post("a", T0)]}, client_id="id1", client_secret="s1",
                          token_ttl_s=100)
    assert requests.post(replay.token_url, auth=("id1", "wrong"), data={"grant_type": "client_credentials"},
                         timeout=5).status_code == 401
    assert requests.post(replay.token_url, auth=("id1", "s1"), data={"grant_type": "password"},
                         timeout=5).status_code == 400
    token = requests.post(replay.token_url, auth=("id1", "s1"), data={"grant_type": "client_credentials"},
                          timeout=5).json()
    assert token["token_type"] == "bearer" and token["expires_in"] == 100
    assert replay.tokens_issued == 1 and replay.token_requests == 3
    listing = f"{replay.url}/r/pics/new"
    assert requests.get(listing, timeout=5).status_code == 401
    ok = requests.get(listing, headers={"Authorization": f"bearer {token['access_token']}"}, timeout=5)
    assert ok.status_code == 200 and _ids(ok) == ["a"]
    replay.expire_tokens()
    assert requests.get(listing, headers={"Authorization": f"bearer {token['access_token']}"},
                        timeout=5).status_code == 401


def test_token_expiry_follows_the_clock(dev_server: DevServer, virtual_clock) -> None:
    replay = RedditReplay(dev_server, {"pics": [make_post("a", T0)]}, token_ttl_s=100)
    token = requests.post(replay.token_url, auth=(replay.client_id, replay.client_secret),
                          data={"grant_type": "client_credentials"}, timeout=5).json()["access_token"]
    headers = {"Authorization": f"bearer {token}"}
    assert requests.get(f"{replay.url}/r/pics/new", headers=headers, timeout=5).status_code == 200
    virtual_clock.sleep(101)
    assert requests.get(f"{replay.url}/r/pics/new", headers=headers, timeout=5).status_code == 401


def test_ratelimit_headers_count_down_then_429(dev_server: DevServer, virtual_clock) -> None:
    replay = RedditReplay(dev_server, {"pics": []}, oauth=False, ratelimit_budget=2, ratelimit_window_s=600)
    virtual_clock.sleep(600 - virtual_clock.now() % 600 + 1)  # start of a window
    answers = [_get(f"{replay.url}/r/pics/new.json") for _ in range(3)]
    assert [a.headers["X-Ratelimit-Remaining"] for a in answers] == ["1.0", "0.0", "0.0"]
    assert [a.headers["X-Ratelimit-Used"] for a in answers] == ["1", "2", "3"]
    assert 590 <= int(answers[0].headers["X-Ratelimit-Reset"]) <= 600
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].headers["Retry-After"] == answers[2].headers["X-Ratelimit-Reset"]
    assert replay.throttled == 1
    virtual_clock.sleep(600)
    assert _get(f"{replay.url}/r/pics/new.json").status_code == 200


def test_injected_faults_come_first_and_can_target_a_source(anon: RedditReplay) -> None:
    anon.add_posts("other", [make_post("o1", T0)])
    anon.inject(fault_429(retry_after=3), fault_5xx(502))
    anon.inject(fault_malformed(), source="other")
    pics = f"{anon.url}/r/pics/new.json"
    first = _get(pics)
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    assert _get(pics).status_code == 502
    assert _get(pics).status_code == 200
    broken = _get(f"{anon.url}/r/other/new.json")
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.text)
    assert _ids(_get(f"{anon.url}/r/other/new.json")) == ["o1"]


def test_add_posts_replaces_by_id(anon: RedditReplay) -> None:
    anon.add_posts("pics", [make_post("p39", T0 + 39, score=50)])
    posts = anon.posts("pics")
    assert len(posts) == 40 and posts[0]["score"] == 50


@pytest.mark.shared
def test_recorded_pagination_is_served_as_recorded(dev_server: DevServer, shared_reddit: Path) -> None:
    page1 = load_recorded_listing(shared_reddit / "r_reddit_api_test_new_2016_page1.json")
    page2 = load_recorded_listing(shared_reddit / "r_reddit_api_test_new_2016_page2.json")
    replay = RedditReplay(dev_server, oauth=False)
    replay.add_posts("reddit_api_test", page1 + page2, keep_order=True)
    base = f"{replay.url}/r/reddit_api_test/new.json"
    first = _get(base, limit=100)
    assert _ids(first) == [p["id"] for p in page1]
    assert first.json()["data"]["after"] == "t3_37ouo3"  # what Reddit answered
    assert _ids(_get(base, limit=100, after="t3_37ouo3")) == [p["id"] for p in page2]


@pytest.mark.shared
def test_load_recorded_listing_reads_every_file(shared_reddit: Path) -> None:
    files = sorted(shared_reddit.glob("*.json"))
    assert len(files) == 14
    for path in files:
        posts = load_recorded_listing(path)
        assert posts and all(p.get("id") and p.get("created_utc") for p in posts), path.name
