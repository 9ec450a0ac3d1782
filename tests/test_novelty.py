"""Novelty models: selection, calibration, persistence, atomic activation, refit, edge cases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mining import novelty as nv
from mining.settings import Settings, load_settings


@pytest.fixture
def nsettings(mining_home: Path) -> Settings:
    """Settings for novelty tests (no server needed)."""
    return load_settings(env={}, home=mining_home)


def clusters(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """Points around the given centres, L2-normalised (embeddings live on the sphere)."""
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1]))
    return nv.l2_normalise(x)


@pytest.fixture
def sphere() -> dict[str, np.ndarray]:
    """Liked images in 4 clusters, others in 12 other clusters, 48-d."""
    rng = np.random.default_rng(42)
    centres = rng.standard_normal((16, 48))
    return {
        "liked": clusters(rng, centres[:4], 300, 0.35),
        "stream": clusters(rng, centres[4:], 400, 0.35),
        "fresh_liked": clusters(rng, centres[:4], 4000, 0.35),
        "fresh_other": clusters(rng, centres[4:], 2000, 0.35),
    }


def test_knn_scores_nearest_neighbours_and_excludes_self() -> None:
    gallery = np.eye(4, dtype=np.float32)
    model = nv.KnnCosineModel(k=1).fit(gallery)
    np.testing.assert_allclose(model.score(gallery), 1.0, rtol=1e-6)
    # leave-one-out: a gallery member's own match is ignored, the others are orthogonal
    np.testing.assert_allclose(model.score(gallery, exclude_self=True), 0.0, atol=1e-6)
    q = nv.l2_normalise(np.array([[1.0, 1.0, 0.0, 0.0]]))
    assert model.score(q)[0] == pytest.approx(np.sqrt(0.5), rel=1e-5)


def test_knn_chunking_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((500, 17)), rng.standard_normal((300, 17))
    model = nv.KnnCosineModel(k=5).fit(g)
    whole = model.score(q)
    monkeypatch.setattr(nv, "_CHUNK_BYTES", 4 * 500 * 7)  # 7 query rows per chunk
    np.testing.assert_allclose(model.score(q), whole, rtol=1e-6)  # BLAS blocking differs in the last ulp
    sims = nv.l2_normalise(q) @ nv.l2_normalise(g).T
    np.testing.assert_allclose(whole, np.sort(sims, axis=1)[:, -5:].mean(axis=1), rtol=1e-5)


def test_selection_and_calibration_hit_target_recall(sphere: dict[str, np.ndarray], nsettings: Settings) -> None:
    fitted = nv.fit_and_select(sphere["liked"], sphere["stream"], nsettings, seed=0)
    m = fitted.metrics
    assert m["selection"] == "pu_auroc" and set(m["pu_auroc"]) == {"knn", "gmm"}
    assert m["recall_at_threshold"] == pytest.approx(0.9, abs=0.01)
    # on fresh liked images the final model keeps about the target share
    recall = fitted.accepts(sphere["fresh_liked"]).mean()
    assert 0.85 <= recall <= 0.96, recall
    assert fitted.accepts(sphere["fresh_other"]).mean() < 0.05
    assert fitted.version.startswith(f"{fitted.kind}-") and len(fitted.version.split("-")[-1]) == 8
    assert fitted.train_size == 300 and fitted.dim == 48 and fitted.embedder == nsettings.embedder


@pytest.mark.parametrize("recall", [0.5, 0.8])
def test_other_target_recalls(sphere: dict[str, np.ndarray], nsettings: Settings, recall: float) -> None:
    fitted = nv.fit_and_select(sphere["liked"], None, nsettings.replace(novelty_target_recall=recall))
    assert fitted.metrics["selection"] == "size_rule" and fitted.kind == "knn"
    assert fitted.accepts(sphere["fresh_liked"]).mean() == pytest.approx(recall, abs=0.06)


def test_target_acceptance_mode(sphere: dict[str, np.ndarray], nsettings: Settings) -> None:
    rng = np.random.default_rng(3)
    # a stream that is 30% liked-like, 70% other: accept 20% of it
    stream = np.concatenate([sphere["fresh_liked"][:300], sphere["fresh_other"][:700]])
    stream = stream[rng.permutation(len(stream))]
    s = nsettings.replace(novelty_target_acceptance=0.2)
    fitted = nv.fit_and_select(sphere["liked"], stream, s)
    assert fitted.metrics["calibration"] == "target_acceptance"
    assert fitted.metrics["acceptance_on_stream"] == pytest.approx(0.2, abs=0.005)
    assert fitted.accepts(stream).mean() == pytest.approx(0.2, abs=0.005)
    # without a stream it falls back to the target recall
    fallback = nv.fit_and_select(sphere["liked"], None, s)
    assert fallback.metrics["calibration"] == "target_recall"


def _sheet(rng: np.random.Generator, n: int, off: float, d: int = 16) -> np.ndarray:
    """Points spread on a 2-d sheet, displaced off it by ``off``: only a density model sees the offset."""
    x = np.zeros((n, d))
    x[:, 0] = 5.0
    x[:, 1:3] = rng.standard_normal((n, 2))
    x[:, 3:] = off * rng.standard_normal((n, d - 3))
    return x


def _fine_clusters(rng: np.random.Generator, n_liked: int, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """200 tight liked clusters with other clusters right beside them: too fine for 16 components."""
    c = rng.standard_normal((200, d)) * 0.3
    c[:, 0] += 3
    near = c + rng.standard_normal((200, d)) * 0.08

    def draw(cc: np.ndarray, n: int) -> np.ndarray:
        return cc[rng.integers(0, len(cc), n)] + 0.01 * rng.standard_normal((n, d))

    return draw(c, n_liked), draw(near, 600)


@pytest.mark.slow
def test_selection_prefers_the_better_model_against_the_size_rule(nsettings: Settings) -> None:
    rng = np.random.default_rng(1)
    s = nsettings.replace(novelty_gmm_min_gallery=1000, novelty_gmm_components=8)
    # GMM wins although the size rule (800 < 1000) says kNN
    liked, stream = _sheet(rng, 800, 0.01), _sheet(rng, 600, 0.08)
    fitted = nv.fit_and_select(liked, stream, s)
    pu = fitted.metrics["pu_auroc"]
    assert fitted.metrics["size_rule_kind"] == "knn"
    assert pu["gmm"] > pu["knn"] + 0.02 and fitted.kind == "gmm"
    # kNN wins although the size rule (1500 >= 1000) says GMM
    liked, stream = _fine_clusters(rng, 1500)
    fitted = nv.fit_and_select(liked, stream, s)
    pu = fitted.metrics["pu_auroc"]
    assert fitted.metrics["size_rule_kind"] == "gmm"
    assert pu["knn"] > pu["gmm"] + 0.01 and fitted.kind == "knn"


def test_size_rule_without_stream(nsettings: Settings) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 12))
    assert nv.fit_and_select(x, None, nsettings).kind == "knn"
    big = nv.fit_and_select(x, None, nsettings.replace(novelty_gmm_min_gallery=50))
    assert big.kind == "gmm" and big.metrics["selection"] == "size_rule"
    # a stream too small to rank models also falls back to the rule
    assert nv.fit_and_select(x, rng.standard_normal((5, 12)), nsettings).metrics["selection"] == "size_rule"


@pytest.mark.parametrize("kind", ["knn", "gmm"])
def test_persistence_round_trip_gives_identical_scores(sphere: dict[str, np.ndarray], nsettings: Settings,
                                                       kind: str) -> None:
    fitted = nv.fit_and_select(sphere["liked"], sphere["stream"], nsettings, kinds=(kind,))
    path = nv.save(nsettings, fitted)
    assert path == nsettings.novelty_dir / fitted.version
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.npz"]
    with np.load(path / "model.npz", allow_pickle=False) as npz:  # plain arrays, no pickle
        assert npz.files
    loaded = nv.load_version(nsettings, fitted.version)
    q = sphere["fresh_other"][:500]
    np.testing.assert_array_equal(loaded.score(q), fitted.score(q))
    assert (loaded.kind, loaded.threshold, loaded.train_size, loaded.params) == \
        (fitted.kind, fitted.threshold, fitted.train_size, fitted.params)
    assert loaded.metrics == json.loads(json.dumps(fitted.metrics))
    assert nv.save(nsettings, fitted) == path  # saving again is a no-op
    if kind == "knn":  # cosine relative to the stream's mean, which travels with the version
        assert loaded.params["centered"] and loaded.model.center is not None


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_gmm_covariance_types_round_trip(nsettings: Settings, cov: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 10))
    model = nv.GmmModel(n_components=3, covariance_type=cov, pca_dims=0).fit(x)
    again = nv.GmmModel.from_arrays(model.params, model.arrays())
    np.testing.assert_array_equal(again.score(x[:50]), model.score(x[:50]))
    # log-likelihood: points from the gallery's region beat far-away ones
    far = nv.l2_normalise(rng.standard_normal((50, 10)) + 10 * np.eye(10)[0])
    assert model.score(x[:50]).mean() > model.score(far).mean()


def test_gmm_pca_bounds_dims_and_components(nsettings: Settings) -> None:
    rng = np.random.default_rng(4)
    model = nv.GmmModel(n_components=16, pca_dims=8).fit(rng.standard_normal((30, 40)))
    assert model.params["pca_dims_fitted"] == 8 and model.params["n_components_fitted"] == 6
    assert model.pca_components is not None and model.pca_components.shape == (40, 8)
    tiny = nv.GmmModel(n_components=16, pca_dims=0).fit(rng.standard_normal((3, 40)))
    assert tiny.params["n_components_fitted"] == 1 and tiny.params["pca_dims_fitted"] == 2
    assert np.isfinite(tiny.score(rng.standard_normal((4, 40)))).all()


def test_activation_is_atomic_and_versions_listed(sphere: dict[str, np.ndarray], nsettings: Settings,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert nv.load_active(nsettings) is None and nv.list_versions(nsettings) == []
    a = nv.fit_and_select(sphere["liked"], None, nsettings, kinds=("knn",))
    b = nv.fit_and_select(sphere["liked"], None, nsettings, kinds=("gmm",))
    nv.save(nsettings, a)
    nv.save(nsettings, b)
    nv.activate(nsettings, a.version)
    assert nv.load_active(nsettings).version == a.version
    # a crash while writing the new active.json leaves the old one whole and live
    real_replace = os.replace

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        nv.activate(nsettings, b.version)
    monkeypatch.setattr(os, "replace", real_replace)
    active_json = nsettings.novelty_dir / "active.json"
    assert json.loads(active_json.read_text())["version"] == a.version
    assert [p.name for p in nsettings.novelty_dir.iterdir() if p.name.endswith(".tmp")] == []
    nv.activate(nsettings, b.version)
    assert nv.load_active(nsettings).version == b.version
    listed = nv.list_versions(nsettings)
    assert {m["version"] for m in listed} == {a.version, b.version}
    assert [m["version"] for m in listed if m["active"]] == [b.version]


def test_missing_version_fails_clearly(nsettings: Settings, sphere: dict[str, np.ndarray]) -> None:
    with pytest.raises(nv.NoveltyModelError, match=r"knn-19990101T000000-deadbeef.*not found"):
        nv.load_version(nsettings, "knn-19990101T000000-deadbeef")
    with pytest.raises(nv.NoveltyModelError, match="not found"):
        nv.activate(nsettings, "gmm-19990101T000000-deadbeef")
    assert not (nsettings.novelty_dir / "active.json").exists()
    # an active.json naming a deleted version is an error, not "no model"
    fitted = nv.fit_and_select(sphere["liked"][:20], None, nsettings)
    nv.activate(nsettings, nv.save(nsettings, fitted).name)
    for p in (nsettings.novelty_dir / fitted.version).iterdir():
        p.unlink()
    (nsettings.novelty_dir / fitted.version).rmdir()
    with pytest.raises(nv.NoveltyModelError, match="not found"):
        nv.load_active(nsettings)


@pytest.mark.parametrize("kind", ["knn", "gmm"])
def test_tiny_gallery_does_not_crash(nsettings: Settings, kind: str) -> None:
    rng = np.random.default_rng(6)
    liked, stream = rng.standard_normal((3, 1280)), rng.standard_normal((40, 1280))
    for unl in (None, stream):
        fitted = nv.fit_and_select(liked, unl, nsettings, kinds=(kind,))
        assert np.isfinite(fitted.threshold)
        assert fitted.score(stream).shape == (40,)
    auto = nv.fit_and_select(liked, stream, nsettings)
    assert auto.metrics["folds"] == 3 and auto.kind in nv.KINDS
    with pytest.raises(nv.NoveltyModelError, match="at least 2"):
        nv.fit_and_select(liked[:1], stream, nsettings)


def test_any_dim_works_and_dim_mismatch_is_refused(nsettings: Settings) -> None:
    rng = np.random.default_rng(7)
    fitted = nv.fit_and_select(rng.standard_normal((40, 17)), rng.standard_normal((50, 17)), nsettings)
    assert fitted.dim == 17
    loaded = nv.load_version(nsettings, nv.save(nsettings, fitted).name)
    assert loaded.score(rng.standard_normal((5, 17))).shape == (5,)
    with pytest.raises(ValueError, match="dim 17"):
        loaded.score(rng.standard_normal((5, 512)))


def test_bad_settings_are_refused(nsettings: Settings) -> None:
    x = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(ValueError, match="COVARIANCE"):
        nv.fit_and_select(x, None, nsettings.replace(novelty_gmm_covariance="fullest"))
    with pytest.raises(ValueError, match="unknown novelty model kind"):
        nv.fit_and_select(x, None, nsettings, kinds=("svm",))


def test_compare_and_refit_refuse_a_worse_model(sphere: dict[str, np.ndarray], nsettings: Settings) -> None:
    rng = np.random.default_rng(8)
    good = nv.fit_and_select(sphere["liked"], sphere["stream"], nsettings)
    nv.activate(nsettings, nv.save(nsettings, good).name)
    held, stream = sphere["fresh_liked"][:200], sphere["fresh_other"][:400]
    # a polluted gallery: half the "liked" images are random others
    polluted = np.concatenate([sphere["liked"][:150], sphere["fresh_other"][1000:1150]])
    worse = nv.fit_and_select(polluted, sphere["stream"], nsettings)
    assert nv.compare(worse, good, held, stream) is False
    cmp = worse.metrics["comparison"]
    assert cmp["new_auroc"] < cmp["active_auroc"] and cmp["active_version"] == good.version
    assert nv.compare(good, None, held, stream) is True
    # the active model gets no credit for having memorised the held-out images
    assert nv.compare(good, good, sphere["liked"][:100], stream) is True

    result = nv.refit(nsettings, np.concatenate([polluted, rng.standard_normal((100, 48))]), stream)
    assert not result.activated and nv.load_active(nsettings).version == good.version
    better = np.concatenate([sphere["liked"], sphere["fresh_liked"][2000:2600]])
    heldout = np.zeros(len(better), dtype=bool)
    heldout[300:] = True  # the images added since the active version
    result = nv.refit(nsettings, better, stream, heldout=heldout, seed=1)
    assert result.activated and result.new_auroc >= result.active_auroc
    live = nv.load_active(nsettings)
    assert live.version == result.fitted.version != good.version and live.train_size == len(better)
    assert live.metrics["comparison"]["active_version"] == good.version
