"""Batched image embedding on onnxruntime, with decoding overlapped with inference.

The embedder is the pipeline's bottleneck, so images are decoded (draft mode, crop-only
resize: see mining.preprocess) by a small thread pool that runs ahead of the model, and
inference runs on whole batches with tuned intra-op threads. Decoding and onnxruntime
both release the GIL, so on 2 cores the two overlap. The look-ahead is bounded (a
fixed number of images in flight), so memory stays flat for any number of batches.

The embedding width is read from the model (output shape, or one dummy run when the
shape is symbolic): nothing here assumes 512 or 1280. Vectors are L2-normalised so
cosine similarity is a dot product downstream.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mining import schemas
from mining.lake import Interval, StepResult, read_partition, write_partition
from mining.models import ModelSpec, load_spec, model_path
from mining.preprocess import load_for_model
from mining.settings import Settings

log = logging.getLogger(__name__)

Source = str | Path | bytes


@dataclass
class EmbedResult:
    """One row per input, in input order; rows that failed are zeros with ok False."""

    vectors: np.ndarray  # float32 [n, dim], L2-normalised
    ok: np.ndarray  # bool [n]
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.errors)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def session_options(threads: int) -> Any:
    """Tuned onnxruntime options: all graph optimisations, intra-op threads = cores by default."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads if threads > 0 else _cores()
    opts.inter_op_num_threads = 1
    return opts


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it, always CPU as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Embedder:
    """An ONNX image embedder: ``embed_paths`` for files, ``embed_arrays`` for ready tensors."""

    def __init__(self, spec: ModelSpec, path: Path, batch_size: int = 16, threads: int = 0,
                 decode_workers: int | None = None) -> None:
        import onnxruntime as ort

        self.spec = spec
        self.path = Path(path)
        self.batch_size = max(1, int(batch_size))
        self.decode_workers = decode_workers or _cores()
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                            providers=providers())
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_name = spec.input_name if spec.input_name in inputs else next(iter(inputs))
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = spec.outputs[0] if spec.outputs and spec.outputs[0] in outputs else outputs[0]
        batch_dim = inputs[self.input_name].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._dim: int | None = None
        shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output_name)
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            self._dim = int(shape[1])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def model_id(self) -> str:
        """``<name>@<version>``: what the embeddings table records."""
        return self.spec.model_id

    @property
    def dim(self) -> int:
        """Embedding width as the model reports it (one dummy run if the shape is symbolic)."""
        if self._dim is None:
            size = self.spec.preprocess.crop
            self._dim = int(self._run(np.zeros((1, 3, size, size), np.float32)).shape[1])
        return self._dim

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        step = self.fixed_batch or n
        outs = []
        for i in range(0, n, step):
            chunk = batch[i: i + step]
            pad = step - chunk.shape[0]
            if pad:  # a fixed-batch model: pad the tail and drop the padding's outputs
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(np.asarray(out, np.float32).reshape(step, -1)[: step - pad])
        raw = np.concatenate(outs) if outs else np.zeros((0, self._dim or 0), np.float32)
        if self._dim is None and raw.size:
            self._dim = int(raw.shape[1])
        return raw

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """[n,3,H,W] float32 model inputs -> [n,dim] L2-normalised float32 (in batch_size chunks)."""
        batch = np.ascontiguousarray(batch, np.float32)
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = [self._run(batch[i: i + self.batch_size]) for i in range(0, batch.shape[0], self.batch_size)]
        return l2_normalise(np.concatenate(parts))

    def _decode(self, src: Source) -> np.ndarray:
        return load_for_model(src, self.spec)

    def iter_decoded(self, sources: Sequence[Source]) -> Iterator[list[tuple[int, np.ndarray | None, str | None]]]:
        """Batches of (index, tensor or None, error) decoded by a pool that stays <= 2 batches ahead."""
        ahead = self.batch_size * 2
        with ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="decode") as pool:
            pending: deque[tuple[int, Future[np.ndarray]]] = deque()
            nxt = 0
            while nxt < len(sources) or pending:
                while nxt < len(sources) and len(pending) < ahead:
                    pending.append((nxt, pool.submit(self._decode, sources[nxt])))
                    nxt += 1
                batch = []
                while pending and len(batch) < self.batch_size:
                    idx, fut = pending.popleft()
                    try:
                        batch.append((idx, fut.result(), None))
                    except Exception as exc:  # per-item failure is data
                        batch.append((idx, None, f"{type(exc).__name__}: {exc}"))
                    if nxt < len(sources):  # keep the pool busy while this batch fills
                        pending.append((nxt, pool.submit(self._decode, sources[nxt])))
                        nxt += 1
                yield batch

    def embed_paths(self, paths: Sequence[Source]) -> EmbedResult:
        """Embed files (or bytes); unreadable ones get ok=False and an error, never an exception."""
        n = len(paths)
        errors: list[str | None] = [None] * n
        ok = np.zeros(n, bool)
        rows: dict[int, np.ndarray] = {}
        for batch in self.iter_decoded(list(paths)):
            good = [(i, arr) for i, arr, _ in batch if arr is not None]
            for i, _, err in batch:
                if err is not None:
                    errors[i] = err
            if not good:
                continue
            try:
                vecs = self.embed_arrays(np.stack([a for _, a in good]))
            except Exception as exc:  # e.g. a model that rejects this input: mark the batch, go on
                for i, _ in good:
                    errors[i] = f"inference failed: {type(exc).__name__}: {exc}"
                continue
            for (i, _), v in zip(good, vecs, strict=True):
                rows[i] = v
                ok[i] = True
        vectors = np.zeros((n, self.dim), np.float32)
        for i, v in rows.items():
            vectors[i] = v
        return EmbedResult(vectors, ok, errors)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def load_embedder(settings: Settings, name: str | None = None) -> Embedder:
    """The configured embedder (settings.embedder), ready to run; ModelMissingError if not installed."""
    name = name or settings.embedder
    spec = load_spec(settings, name)
    if spec.kind != "embedder":
        raise ValueError(f"model {name!r} is a {spec.kind}, not an embedder")
    return Embedder(spec, model_path(settings, name), batch_size=settings.embed_batch_size,
                    threads=settings.intra_op_threads, decode_workers=settings.embed_decode_workers or None)


def embed_paths(settings: Settings, paths: Sequence[Source], name: str | None = None) -> EmbedResult:
    """Convenience for `mining score PATH...` and `mining init`: load the embedder, embed the files."""
    return load_embedder(settings, name).embed_paths(paths)


# ---- the pipeline step -------------------------------------------------------------------

def embed_interval(settings: Settings, interval: Interval, embedder: Embedder | None = None) -> StepResult:
    """Embed each distinct downloaded image of the interval once; one embeddings partition per hour.

    Rows for images this model already embedded in the partition are reused, so a rerun is
    cheap and yields the same rows. An unreadable image is not embedded: it is counted and
    logged, and the scorer marks its candidates failed.
    """
    counts = {"hours": 0, "candidates": 0, "images": 0, "embedded": 0, "reused": 0, "failed": 0}
    paths: list[str] = []
    for hour in interval.hours():
        cands = read_partition(settings.lake_dir, "candidates", hour)
        if cands is None:
            continue
        counts["hours"] += 1
        todo: dict[str, str] = {}
        for row in cands.select(["status", "sha256", "path"]).to_pylist():
            if row["status"] == "downloaded" and row["sha256"] and row["path"]:
                counts["candidates"] += 1
                todo.setdefault(row["sha256"], row["path"])
        counts["images"] += len(todo)
        if todo and embedder is None:
            embedder = load_embedder(settings)
        previous = _previous_rows(settings, hour, embedder.model_id if embedder else None)
        rows = {sha: previous[sha] for sha in todo if sha in previous}
        counts["reused"] += len(rows)
        fresh = sorted(sha for sha in todo if sha not in rows)
        if fresh and embedder is not None:
            result = embedder.embed_paths([settings.home / todo[sha] for sha in fresh])
            for j, sha in enumerate(fresh):
                if result.ok[j]:
                    rows[sha] = result.vectors[j]
                    counts["embedded"] += 1
                else:
                    counts["failed"] += 1
                    log.warning("embed: %s (%s) not embedded: %s", sha, todo[sha], result.errors[j])
        table = _table(rows, embedder.model_id if embedder else "", hour)
        paths.append(str(write_partition(settings.lake_dir, "embeddings", hour, table)))
    path = paths[0] if len(paths) == 1 else (str(settings.lake_dir / "embeddings") if paths else None)
    return StepResult("embed", str(interval), path, counts)


def _previous_rows(settings: Settings, hour: Interval, model_id: str | None) -> dict[str, np.ndarray]:
    if model_id is None:
        return {}
    old = read_partition(settings.lake_dir, "embeddings", hour)
    if old is None or old.num_rows == 0:
        return {}
    out = {}
    for row in old.to_pylist():
        if row["model"] == model_id:
            out[row["sha256"]] = np.asarray(row["embedding"], np.float32)
    return out


def _table(rows: dict[str, np.ndarray], model_id: str, hour: Interval) -> pa.Table:
    shas = sorted(rows)
    return pa.table({
        "sha256": pa.array(shas, pa.string()),
        "model": pa.array([model_id] * len(shas), pa.string()),
        "dim": pa.array([int(rows[s].shape[0]) for s in shas], pa.int32()),
        "embedding": pa.array([rows[s].astype(np.float32) for s in shas], pa.list_(pa.float32())),
        "interval_start": pa.array([hour.start] * len(shas), schemas.TS),
    }, schema=schemas.EMBEDDINGS)
