"""The taste model: does a new image belong with the images this person already likes?

Two model kinds behind one interface (:class:`NoveltyModel`), because no single one fits every
gallery size: the original system's Gaussian mixture (log-likelihood of L2-normalised
embeddings) needs thousands of liked images, while the mean cosine similarity to the k nearest
liked images works from a handful on. :func:`fit_and_select` picks the kind by held-out
performance and calibrates the threshold from held-out liked images (never typed in), and the
result is persisted as a versioned directory of plain arrays + JSON and activated atomically.

Selection protocol (documented so reports can cite it):

* liked images are split into folds (5, or fewer for tiny galleries; one 10% split capped at
  2000 images once the gallery exceeds 10 000), each candidate kind is fitted on the training
  part and scores the held-out liked images and the unlabelled stream of candidates already seen;
  the positive-unlabelled AUROC (held-out liked vs stream, averaged over folds) chooses the kind;
* with no stream (or fewer than 10 stream images) the rule by gallery size decides: kNN below
  ``settings.novelty_gmm_min_gallery`` (2000) liked images, GMM from there on;
* threshold: the ``1 - novelty_target_recall`` quantile of the out-of-fold liked scores (keep 90%
  of liked images by default), or, when ``novelty_target_acceptance`` is set and a stream exists,
  the score that accepts that share of the stream under the final model;
* the chosen kind is then refitted on all liked images (at most ``novelty_max_fit_rows`` of them,
  a seeded sample, which keeps memory bounded at 300k-image scale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mining import clock
from mining.lake import atomic_write_bytes
from mining.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("knn", "gmm")
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_MIN_STREAM = 10  # fewer unlabelled images than this cannot rank models: use the size rule
_MAX_FOLDS = 5
_SPLIT_ABOVE = 10_000  # larger galleries use one held-out split instead of k folds
_MAX_HELDOUT = 2_000  # held-out liked images scored per split (PU AUROC is precise enough)
_MAX_STREAM_EVAL = 10_000  # unlabelled images scored per split (a seeded sample)
_CHUNK_BYTES = 64 * 1024 * 1024  # bound on temporary similarity/projection blocks
_FORMAT = 1


class NoveltyModelError(RuntimeError):
    """A novelty model version is missing, unreadable, or cannot be fitted."""


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def l2_normalise(X: np.ndarray) -> np.ndarray:
    """A float32 row-normalised copy (zero rows stay zero) so cosine = dot product."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array [n, d], got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return X / norms


@contextmanager
def _blas_threads(work: float) -> Iterator[None]:
    """One BLAS thread for small problems: on a busy 2-core box, threads spinning over tiny
    matrices were measured 10-100x slower than one thread (e.g. 48x48 triangular solves)."""
    if work >= 2e8:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _chunk_rows(row_bytes: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, row_bytes))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def _sample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``cap`` of ``n`` rows (all of them when n <= cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def _take(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Normalised float32 copy of selected rows (only those rows are copied)."""
    return l2_normalise(X[rows])


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
class NoveltyModel:
    """Scores embeddings: higher = more like the liked gallery.

    Subclasses persist themselves as plain arrays (:meth:`arrays`) and JSON-able ``params`` so
    a saved version never needs pickle and loads into the same scores bit for bit.
    """

    kind: ClassVar[str] = ""
    params: dict[str, Any]
    dim: int | None = None

    def fit(self, X: np.ndarray) -> NoveltyModel:
        raise NotImplementedError

    def score(self, X: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """Scores as float64 [n]; ``exclude_self`` treats rows that are in the gallery as held out."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> NoveltyModel:
        raise NotImplementedError

    def _check_dim(self, X: np.ndarray) -> None:
        if self.dim is None:
            raise NoveltyModelError(f"{self.kind} model is not fitted")
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"{self.kind} model expects embeddings of dim {self.dim}, got shape {X.shape}")


class KnnCosineModel(NoveltyModel):
    """Mean cosine similarity to the k nearest liked embeddings.

    Works from a few liked images on (measured AUROC about 0.95 on ~60 photos where a GMM is at
    chance). With a ``center`` (the mean of the unlabelled stream, i.e. what is typically posted),
    cosines are taken after subtracting it: CNN features share a large common direction, and
    measuring similarity relative to the background raised held-out AUROC on the shared photos from
    0.951 to 0.964 (mean of 5 seeds). Scoring is a chunked float32 matmul, so memory is
    O(chunk x gallery), never O(queries x gallery).
    """

    kind: ClassVar[str] = "knn"

    def __init__(self, k: int = 5, center: np.ndarray | None = None) -> None:
        if k < 1:
            raise ValueError("knn k must be >= 1")
        self.params = {"k": int(k), "centered": center is not None}
        self.center = None if center is None else np.asarray(center, dtype=np.float32).reshape(-1)
        self.gallery: np.ndarray | None = None
        self.dim = None

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        Z = l2_normalise(X)
        if self.center is not None:
            Z = l2_normalise(Z - self.center)
        return Z

    def fit(self, X: np.ndarray) -> KnnCosineModel:
        X = np.asarray(X)
        if X.ndim != 2 or len(X) == 0:
            raise NoveltyModelError(f"cannot fit a knn model on embeddings of shape {X.shape}")
        if self.center is not None and self.center.shape[0] != X.shape[1]:
            raise ValueError(f"knn center has dim {self.center.shape[0]}, embeddings {X.shape[1]}")
        self.gallery = np.ascontiguousarray(self._prepare(X))
        self.dim = X.shape[1]
        return self

    def score(self, X: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        X = np.asarray(X)
        self._check_dim(X)
        assert self.gallery is not None
        G = self.gallery
        n_g = len(G)
        out = np.empty(len(X), dtype=np.float64)
        step = _chunk_rows(4 * n_g)
        for a in range(0, len(X), step):
            sims = self._prepare(X[a:a + step]) @ G.T  # [chunk, n_g] float32
            if exclude_self:
                # an identical vector is the same image: leave it out (leave-one-out scoring)
                sims[sims >= 1.0 - 1e-5] = -np.inf
            k = min(self.params["k"], n_g)
            top = np.partition(sims, n_g - k, axis=1)[:, n_g - k:] if k < n_g else sims
            if exclude_self:
                top = np.where(np.isfinite(top), top, np.nan)
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(top.astype(np.float64), axis=1)
                out[a:a + step] = np.nan_to_num(mean, nan=-1.0)
            else:
                out[a:a + step] = top.mean(axis=1, dtype=np.float64)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        assert self.gallery is not None
        arrs = {"gallery": self.gallery}
        if self.center is not None:
            arrs["center"] = self.center
        return arrs

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> KnnCosineModel:
        model = cls(k=params["k"], center=arrays.get("center"))
        model.params = dict(params)
        model.gallery = np.ascontiguousarray(arrays["gallery"], dtype=np.float32)
        model.dim = model.gallery.shape[1]
        return model


class GmmModel(NoveltyModel):
    """The original system's Gaussian mixture; score = log-likelihood of the L2-normalised embedding.

    Optional PCA (computed here from a d x d covariance accumulated in chunks, so there is never a
    float64 copy of the full matrix) keeps a full-covariance fit affordable on 1280-d embeddings.
    Tiny galleries get fewer components (at least 5 points each) and fewer PCA dims (< points).
    """

    kind: ClassVar[str] = "gmm"

    def __init__(self, n_components: int = 16, covariance_type: str = "full", pca_dims: int = 0,
                 reg_covar: float = 1e-5, max_iter: int = 100, seed: int = 0) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        if n_components < 1:
            raise ValueError("gmm n_components must be >= 1")
        self.params = {"n_components": int(n_components), "covariance_type": covariance_type,
                       "pca_dims": int(pca_dims or 0), "reg_covar": float(reg_covar), "max_iter": int(max_iter),
                       "seed": int(seed)}
        self.pca_mean: np.ndarray | None = None
        self.pca_components: np.ndarray | None = None  # [d, p] float32
        self.gmm: Any = None
        self.dim = None

    def _project(self, X: np.ndarray) -> np.ndarray:
        """Normalise and project a chunk to the model space (float64, what sklearn wants)."""
        Z = l2_normalise(X)
        if self.pca_components is not None:
            assert self.pca_mean is not None
            Z = (Z - self.pca_mean) @ self.pca_components
        return Z.astype(np.float64)

    def fit(self, X: np.ndarray) -> GmmModel:
        from sklearn.mixture import GaussianMixture

        Z = l2_normalise(X)
        n, d = Z.shape
        if n < 1:
            raise NoveltyModelError("cannot fit a gmm on an empty gallery")
        self.dim = d
        p = self.params
        # guards for tiny galleries: >= 5 points per component, fewer dims than points
        n_comp = max(1, min(p["n_components"], n // 5))
        dims = p["pca_dims"]
        if dims or n <= d:
            dims = max(1, min(dims or d, d, n - 1))
            mean = Z.mean(axis=0, dtype=np.float64)
            if n <= d:  # few points: SVD of the small centred matrix beats a d x d eigenproblem
                _, _, vt = np.linalg.svd(Z.astype(np.float64) - mean, full_matrices=False)
                comps = vt[:dims].T
            else:  # d x d covariance accumulated in chunks: no float64 copy of the whole matrix
                cov = np.zeros((d, d), dtype=np.float64)
                for a in range(0, n, _chunk_rows(8 * d)):
                    c = Z[a:a + _chunk_rows(8 * d)].astype(np.float64) - mean
                    cov += c.T @ c
                _, vecs = np.linalg.eigh(cov / max(1, n - 1))
                comps = vecs[:, ::-1][:, :dims]
            # fix the sign of each component so refits are reproducible
            signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(dims)])
            comps = comps * np.where(signs == 0, 1.0, signs)
            self.pca_mean = mean.astype(np.float32)
            self.pca_components = np.ascontiguousarray(comps.astype(np.float32))
        else:
            self.pca_mean = self.pca_components = None
        Y = np.concatenate([self._project(Z[a:a + 8192]) for a in range(0, n, 8192)]) if n else Z
        del Z
        if n == 1:
            Y = np.concatenate([Y, Y])  # sklearn needs >= 2 samples; one point is its own mixture
        gmm = GaussianMixture(n_components=n_comp, covariance_type=p["covariance_type"], reg_covar=p["reg_covar"],
                              max_iter=p["max_iter"], random_state=p["seed"])
        with _blas_threads(len(Y) * Y.shape[1] ** 2):
            gmm.fit(Y)
        self.gmm = gmm
        self.params = {**p, "n_components_fitted": int(n_comp), "pca_dims_fitted": int(Y.shape[1])}
        return self

    def score(self, X: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        X = np.asarray(X)
        self._check_dim(X)
        out = np.empty(len(X), dtype=np.float64)
        step = _chunk_rows(8 * max(self.dim or 1, 1) * 4)
        p = self.gmm.means_.shape[1]
        with _blas_threads(len(X) * p * p * len(self.gmm.weights_)):
            for a in range(0, len(X), step):
                out[a:a + step] = self.gmm.score_samples(self._project(X[a:a + step]))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        g = self.gmm
        arrs = {"weights": g.weights_, "means": g.means_, "covariances": g.covariances_,
                "precisions_cholesky": g.precisions_cholesky_, "dim": np.array([self.dim])}
        if self.pca_components is not None:
            arrs["pca_mean"] = self.pca_mean
            arrs["pca_components"] = self.pca_components
        return arrs

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GmmModel:
        """Rebuild from stored arrays: sklearn's public fitted attributes, no pickle."""
        from sklearn.mixture import GaussianMixture

        model = cls(**{k: params[k] for k in ("n_components", "covariance_type", "pca_dims", "reg_covar",
                                              "max_iter", "seed")})
        model.params = dict(params)
        model.dim = int(arrays["dim"][0])
        if "pca_components" in arrays:
            model.pca_mean = np.asarray(arrays["pca_mean"], dtype=np.float32)
            model.pca_components = np.ascontiguousarray(arrays["pca_components"], dtype=np.float32)
        g = GaussianMixture(n_components=len(arrays["weights"]), covariance_type=params["covariance_type"])
        g.weights_ = np.asarray(arrays["weights"])
        g.means_ = np.asarray(arrays["means"])
        g.covariances_ = np.asarray(arrays["covariances"])
        g.precisions_cholesky_ = np.asarray(arrays["precisions_cholesky"])
        pc = g.precisions_cholesky_
        if params["covariance_type"] == "full":
            g.precisions_ = np.einsum("kij,klj->kil", pc, pc)
        elif params["covariance_type"] == "tied":
            g.precisions_ = pc @ pc.T
        else:
            g.precisions_ = pc**2
        g.converged_, g.n_iter_, g.lower_bound_ = True, 0, 0.0
        g.n_features_in_ = g.means_.shape[1]
        model.gmm = g
        return model


_MODEL_TYPES: dict[str, type[NoveltyModel]] = {"knn": KnnCosineModel, "gmm": GmmModel}


def make_model(kind: str, settings: Settings, seed: int = 0, background: np.ndarray | None = None) -> NoveltyModel:
    """A fresh, unfitted model of ``kind`` configured from settings.

    ``background``: mean embedding of the unlabelled stream; the kNN model measures cosine
    relative to it (the GMM's PCA centres on its own).
    """
    if kind == "knn":
        return KnnCosineModel(k=settings.novelty_knn_k, center=background)
    if kind == "gmm":
        return GmmModel(n_components=settings.novelty_gmm_components,
                        covariance_type=settings.novelty_gmm_covariance,
                        pca_dims=settings.novelty_pca_dims, seed=seed)
    raise ValueError(f"unknown novelty model kind {kind!r}; known: {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------
# fitted, versioned models
# ---------------------------------------------------------------------------------------
@dataclass
class FittedNovelty:
    """A calibrated model version: what the scoring step loads and the warehouse records."""

    model: NoveltyModel
    version: str
    kind: str
    params: dict[str, Any]
    train_size: int
    metrics: dict[str, Any]
    threshold: float
    created_at: str
    embedder: str
    dim: int
    extra: dict[str, Any] = field(default_factory=dict)

    def score(self, X: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        return self.model.score(np.asarray(X), exclude_self=exclude_self)

    def accepts(self, X: np.ndarray) -> np.ndarray:
        """Boolean mask: score >= threshold (the decision the cascade makes)."""
        return self.score(X) >= self.threshold

    def meta(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": self.version, "kind": self.kind, "params": self.params,
                "train_size": self.train_size, "metrics": self.metrics, "threshold": self.threshold,
                "created_at": self.created_at, "embedder": self.embedder, "dim": self.dim}


def _version_id(kind: str, model: NoveltyModel, params: dict[str, Any], created: datetime) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for name, arr in sorted(model.arrays().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return f"{kind}-{created.strftime('%Y%m%dT%H%M%S')}-{h.hexdigest()[:8]}"


def _folds(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Held-out index sets: k folds for small galleries, one capped split for large ones."""
    perm = rng.permutation(n)
    if n > _SPLIT_ABOVE:
        return [np.sort(perm[: min(_MAX_HELDOUT, n // 10)])]
    k = min(_MAX_FOLDS, n)
    return [np.sort(f) for f in np.array_split(perm, k)]


def _fit_on(kind: str, settings: Settings, X: np.ndarray, rows: np.ndarray, seed: int,
            background: np.ndarray | None) -> NoveltyModel:
    """Fit on at most novelty_max_fit_rows of ``rows`` (a seeded sample) to bound time and memory."""
    rng = np.random.default_rng(seed + 7)
    use = rows[_sample(len(rows), settings.novelty_max_fit_rows, rng)]
    return make_model(kind, settings, seed, background).fit(_take(X, use))


def _quantile_threshold(scores: np.ndarray, keep: float) -> float:
    """Largest threshold that keeps at least ``keep`` of ``scores`` (score >= threshold)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise NoveltyModelError("no scores to calibrate a threshold on")
    drop = math.floor((1.0 - keep) * len(s) + 1e-9)
    return float(s[min(drop, len(s) - 1)])


def _score_rows(model: NoveltyModel, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    step = _chunk_rows(4 * X.shape[1] * 4)
    for a in range(0, len(rows), step):
        out[a:a + step] = model.score(X[rows[a:a + step]])
    return out


def fit_and_select(liked: np.ndarray, unlabelled: np.ndarray | None, settings: Settings, seed: int = 0,
                   embedder: str | None = None, kinds: tuple[str, ...] | None = None,
                   rows: np.ndarray | None = None) -> FittedNovelty:
    """Choose, calibrate and fit a novelty model on the liked embeddings (see the module doc).

    ``liked`` and ``unlabelled`` are [n, d] arrays of any dim; they are never copied whole (only
    sampled rows are), so a 300k x 1280 float32 gallery stays within a bounded footprint.
    ``kinds`` restricts the candidates (evaluation fits one kind at a time); ``rows`` restricts
    the liked rows used (so a refit's training split needs no copy of the matrix).
    """
    liked = np.asarray(liked)
    if liked.ndim != 2:
        raise ValueError(f"liked embeddings must be [n, d], got shape {liked.shape}")
    base = np.arange(len(liked)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    n, d = len(base), liked.shape[1]
    if n < 2:
        raise NoveltyModelError(f"need at least 2 liked images to fit and calibrate a novelty model, got {n}")
    kinds = tuple(kinds or KINDS)
    for k in kinds:
        if k not in _MODEL_TYPES:
            raise ValueError(f"unknown novelty model kind {k!r}")
    _check_settings(settings)
    rng = np.random.default_rng(seed)
    stream_rows: np.ndarray | None = None
    if unlabelled is not None:
        unlabelled = np.asarray(unlabelled)
        if unlabelled.ndim != 2 or (len(unlabelled) and unlabelled.shape[1] != d):
            raise ValueError(f"unlabelled embeddings must be [m, {d}], got shape {unlabelled.shape}")
        if len(unlabelled) >= _MIN_STREAM:
            stream_rows = _sample(len(unlabelled), _MAX_STREAM_EVAL, rng)
    have_stream = stream_rows is not None
    assert unlabelled is not None or not have_stream
    stream = _take(unlabelled, stream_rows) if have_stream else None  # type: ignore[arg-type]
    background = stream.mean(axis=0) if stream is not None else None

    rule_kind = "knn" if n < settings.novelty_gmm_min_gallery else "gmm"
    if len(kinds) == 1:
        candidates = list(kinds)
    elif have_stream:
        candidates = list(kinds)
    else:
        candidates = [rule_kind if rule_kind in kinds else kinds[0]]

    folds = [base[f] for f in _folds(n, rng)]
    all_rows = base
    oof: dict[str, list[np.ndarray]] = {k: [] for k in candidates}
    fold_auc: dict[str, list[float]] = {k: [] for k in candidates}
    for i, held in enumerate(folds):
        train = np.setdiff1d(all_rows, held, assume_unique=True)
        if len(train) == 0:
            continue
        for kind in candidates:
            model = _fit_on(kind, settings, liked, train, seed + i, background)
            s_held = _score_rows(model, liked, held)
            oof[kind].append(s_held)
            if stream is not None:
                fold_auc[kind].append(auroc(s_held, model.score(stream)))
    pu = {k: float(np.mean(v)) for k, v in fold_auc.items() if v}
    if have_stream and len(candidates) > 1:
        # ties prefer the size rule's kind, which is the cheaper/safer default for this gallery
        chosen = max(candidates, key=lambda k: (round(pu[k], 6), k == rule_kind))
        reason = "pu_auroc"
    else:
        chosen = candidates[0]
        reason = "only_kind" if len(kinds) == 1 else "size_rule"

    held_scores = np.concatenate(oof[chosen])
    model = _fit_on(chosen, settings, liked, all_rows, seed, background)
    stream_scores = model.score(stream) if stream is not None else None
    if settings.novelty_target_acceptance is not None and stream_scores is not None:
        threshold = _quantile_threshold(stream_scores, settings.novelty_target_acceptance)
        mode = "target_acceptance"
    else:
        threshold = _quantile_threshold(held_scores, settings.novelty_target_recall)
        mode = "target_recall"
        if settings.novelty_target_acceptance is not None:
            log.warning("novelty_target_acceptance set but no unlabelled stream yet: calibrating to target recall")
    metrics: dict[str, Any] = {
        "selection": reason,
        "calibration": mode,
        "pu_auroc": pu,
        "recall_at_threshold": float(np.mean(held_scores >= threshold)),
        "acceptance_on_stream": float(np.mean(stream_scores >= threshold)) if stream_scores is not None else None,
        "target_recall": settings.novelty_target_recall,
        "target_acceptance": settings.novelty_target_acceptance,
        "heldout_liked": len(held_scores),
        "stream_size": len(stream_rows) if stream_rows is not None else 0,
        "folds": len(folds),
        "size_rule_kind": rule_kind,
    }
    created = datetime.fromtimestamp(clock.now(), UTC)
    params = dict(model.params)
    used = min(n, settings.novelty_max_fit_rows)
    fitted = FittedNovelty(model=model, version=_version_id(chosen, model, params, created), kind=chosen,
                           params=params, train_size=used, metrics=metrics, threshold=threshold,
                           created_at=created.isoformat(), embedder=embedder or settings.embedder, dim=d)
    log.debug("novelty: chose %s (%s) on %d liked, threshold %.4f, metrics %s", chosen, reason, n, threshold, metrics)
    return fitted


def _check_settings(settings: Settings) -> None:
    if settings.novelty_gmm_covariance not in COVARIANCE_TYPES:
        raise ValueError(f"MINING_NOVELTY_GMM_COVARIANCE must be one of {COVARIANCE_TYPES}")
    for name in ("novelty_gmm_components", "novelty_knn_k", "novelty_max_fit_rows"):
        if getattr(settings, name) < 1:
            raise ValueError(f"MINING_{name.upper()} must be >= 1")
    if settings.novelty_pca_dims < 0:
        raise ValueError("MINING_NOVELTY_PCA_DIMS must be >= 0 (0: no PCA)")


# ---------------------------------------------------------------------------------------
# comparison and refit (weekly)
# ---------------------------------------------------------------------------------------
def heldout_auroc(fitted: FittedNovelty | NoveltyModel, liked_heldout: np.ndarray, unlabelled: np.ndarray) -> float:
    """PU AUROC of held-out liked vs unlabelled; gallery members are scored leave-one-out."""
    return auroc(fitted.score(liked_heldout, exclude_self=True), fitted.score(unlabelled))


def compare(new: FittedNovelty, active: FittedNovelty | None, liked_heldout: np.ndarray,
            unlabelled: np.ndarray) -> bool:
    """True when ``new`` is at least as good as ``active`` on the same held-out data.

    Held-out images the active model was trained on are scored leave-one-out (an identical
    vector is ignored by kNN), so the active model gets no credit for memorising them.
    Both AUROCs are written into ``new.metrics['comparison']`` for the model-versions table.
    """
    new_auc = heldout_auroc(new, liked_heldout, unlabelled)
    if active is None:
        new.metrics["comparison"] = {"new_auroc": new_auc, "active_auroc": None, "active_version": None,
                                     "better_or_equal": True}
        return True
    if active.dim != new.dim:
        ok = True  # a different embedder: the old model cannot score the new vectors
        active_auc: float | None = None
    else:
        active_auc = heldout_auroc(active, liked_heldout, unlabelled)
        ok = bool(new_auc >= active_auc - 1e-9) or math.isnan(active_auc)
    new.metrics["comparison"] = {"new_auroc": new_auc, "active_auroc": active_auc, "active_version": active.version,
                                 "better_or_equal": ok, "heldout_liked": len(liked_heldout),
                                 "unlabelled": len(unlabelled)}
    return ok


@dataclass
class RefitResult:
    """What a weekly refit did and why (both AUROCs on the same held-out data)."""

    fitted: FittedNovelty
    active_version: str | None
    activated: bool
    new_auroc: float
    active_auroc: float | None
    path: Path | None = None


def refit(settings: Settings, liked: np.ndarray, unlabelled: np.ndarray, heldout: np.ndarray | None = None,
          seed: int = 0, embedder: str | None = None, activate_if_better: bool = True) -> RefitResult:
    """Fit a new version and activate it only if it beats (or ties) the active one.

    ``heldout``: a boolean mask (or index array) of liked rows to compare on, ideally the ones
    added since the active version (unseen by it); default a seeded 10% sample (at most 2000).
    The candidate is selected and calibrated on the remaining rows, compared on the held-out
    rows, and, when it wins, refitted with the same kind on all liked rows before it is saved.
    """
    liked = np.asarray(liked)
    unlabelled = np.asarray(unlabelled)
    n = len(liked)
    rng = np.random.default_rng(seed + 1)
    if heldout is None:
        held_idx = np.sort(rng.permutation(n)[: max(1, min(_MAX_HELDOUT, n // 10))])
    else:
        held_idx = np.flatnonzero(heldout) if np.asarray(heldout).dtype == bool else np.asarray(heldout)
    train_idx = np.setdiff1d(np.arange(n), held_idx)
    if len(train_idx) < 2 or len(held_idx) == 0 or len(unlabelled) == 0:
        raise NoveltyModelError("refit needs >= 2 training liked images, >= 1 held-out one and an unlabelled stream")
    active = load_active(settings)
    candidate = fit_and_select(liked, unlabelled, settings, seed=seed, embedder=embedder, rows=train_idx)
    stream_eval = unlabelled[_sample(len(unlabelled), _MAX_STREAM_EVAL, rng)]
    held = liked[held_idx]
    ok = compare(candidate, active, held, stream_eval)
    comparison = candidate.metrics["comparison"]
    if not ok or not activate_if_better:
        return RefitResult(candidate, active.version if active else None, False, comparison["new_auroc"],
                           comparison["active_auroc"])
    final = fit_and_select(liked, unlabelled, settings, seed=seed, embedder=embedder, kinds=(candidate.kind,))
    final.metrics["comparison"] = comparison
    final.metrics["pu_auroc_all_kinds"] = candidate.metrics["pu_auroc"]
    path = save(settings, final)
    activate(settings, final.version)
    return RefitResult(final, active.version if active else None, True, comparison["new_auroc"],
                       comparison["active_auroc"], path)


# ---------------------------------------------------------------------------------------
# persistence: <novelty_dir>/<version>/{model.npz, meta.json}; active.json names the live one
# ---------------------------------------------------------------------------------------
def save(settings: Settings, fitted: FittedNovelty) -> Path:
    """Write the version directory atomically (temp dir + rename); saving twice is a no-op."""
    root = settings.novelty_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / fitted.version
    if (final / "meta.json").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{fitted.version}.", dir=root))
    try:
        with open(tmp / "model.npz", "wb") as fh:
            np.savez(fh, **fitted.model.arrays())
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / "meta.json").write_text(json.dumps(fitted.meta(), indent=2, sort_keys=True, default=_json_default))
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / "meta.json").exists():  # a concurrent save of the same version won
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_version(settings: Settings, version: str) -> FittedNovelty:
    """Load one saved version; a missing or broken one raises NoveltyModelError naming it."""
    if not version or "/" in version or version.startswith("."):
        raise NoveltyModelError(f"invalid novelty model version {version!r}")
    vdir = settings.novelty_dir / version
    try:
        meta = json.loads((vdir / "meta.json").read_text())
        with np.load(vdir / "model.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise NoveltyModelError(f"novelty model version {version!r} not found under {settings.novelty_dir}") from None
    except (OSError, ValueError) as exc:
        raise NoveltyModelError(f"novelty model version {version!r} is unreadable: {exc}") from None
    kind = meta["kind"]
    if kind not in _MODEL_TYPES:
        raise NoveltyModelError(f"novelty model version {version!r} has unknown kind {kind!r}")
    model = _MODEL_TYPES[kind].from_arrays(meta["params"], arrays)
    return FittedNovelty(model=model, version=meta["version"], kind=kind, params=meta["params"],
                         train_size=meta["train_size"], metrics=meta["metrics"], threshold=float(meta["threshold"]),
                         created_at=meta["created_at"], embedder=meta["embedder"], dim=int(meta["dim"]))


def _active_path(settings: Settings) -> Path:
    return settings.novelty_dir / "active.json"


def activate(settings: Settings, version: str) -> None:
    """Make ``version`` the live model: active.json is replaced by rename, never half-written."""
    load_version(settings, version)  # refuse to point at something that does not load
    body = {"version": version, "activated_at": datetime.fromtimestamp(clock.now(), UTC).isoformat()}
    atomic_write_bytes(json.dumps(body, indent=2).encode(), _active_path(settings))


def active_version(settings: Settings) -> str | None:
    path = _active_path(settings)
    try:
        return str(json.loads(path.read_text())["version"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError) as exc:
        raise NoveltyModelError(f"{path} is unreadable: {exc}") from None


def load_active(settings: Settings) -> FittedNovelty | None:
    """The live model, or None before the first fit (a dangling active.json is an error)."""
    version = active_version(settings)
    return None if version is None else load_version(settings, version)


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    """Metadata of every saved version, oldest first, with an ``active`` flag."""
    root = settings.novelty_dir
    if not root.is_dir():
        return []
    live = active_version(settings)
    out = []
    for meta_path in root.glob("*/meta.json"):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        meta["active"] = meta.get("version") == live
        out.append(meta)
    return sorted(out, key=lambda m: (m.get("created_at", ""), m.get("version", "")))
