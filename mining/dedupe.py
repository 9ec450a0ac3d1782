"""Perceptual dedupe: pHash (and its mirror) against the gallery and within a batch.

Reposts are rarely byte-identical: they are resized, recompressed, cropped a little,
mirrored or brightened. So after the exact sha256 check, every image gets the DCT
perceptual hash of itself and of its horizontal mirror; a query matches a gallery entry
when its pHash is within ``max_distance`` bits of the entry's pHash *or* of the entry's
mirrored pHash (so a flipped repost still matches). The threshold and hash size are
settings whose defaults come from ``bench/bench_dedupe.py`` (see docs/dedupe.md).

The gallery's hashes live in a :class:`GalleryIndex`: packed bits in numpy arrays,
searched with XOR + popcount over the whole gallery at once (about a millisecond per
query over a million 64-bit hashes), updated incrementally as images are published, and
persisted atomically to one ``.npz`` file so steps that do not hold the warehouse's single
writer lock (scoring) can dedupe without opening DuckDB.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, ImageOps

from mining.settings import Settings

INDEX_FORMAT = 1
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Hashes = tuple[str, str]  # (phash hex, mirrored phash hex)


# ---- hashing --------------------------------------------------------------------------
def hash_bits(hash_size: int) -> int:
    return hash_size * hash_size


def hash_nbytes(hash_size: int) -> int:
    return (hash_bits(hash_size) + 7) // 8


def _hex(h: imagehash.ImageHash) -> str:
    # Same text as str(h) whenever hash_size**2 is a multiple of 8 (8, 12, 16, ...):
    # big-endian packed bits, so bytes.fromhex() gives the packed array back.
    return np.packbits(np.asarray(h.hash, dtype=bool).ravel()).tobytes().hex()


def _prepare(img: Image.Image, hash_size: int) -> Image.Image:
    """Grey, upright and shrunk to a few times the DCT input: same hash, a fraction of the cost."""
    img = ImageOps.exif_transpose(img)
    work = max(256, hash_size * 4 * 4)  # short side kept >= 4x pHash's own resize input
    short = min(img.size)
    if short > 2 * work:
        img = img.reduce(short // work)
    return img.convert("L")


def image_hashes(img: Image.Image, hash_size: int = 8) -> Hashes:
    """(pHash, pHash of the horizontal mirror) as hex strings of ``hash_size**2`` bits."""
    if hash_size < 4:
        raise ValueError(f"hash_size must be >= 4, got {hash_size}")
    grey = _prepare(img, hash_size)
    return (_hex(imagehash.phash(grey, hash_size=hash_size)),
            _hex(imagehash.phash(ImageOps.mirror(grey), hash_size=hash_size)))


def hash_bytes(data: bytes, hash_size: int = 8) -> Hashes:
    """Hashes of an encoded image (JPEG draft mode keeps decoding cheap)."""
    with Image.open(io.BytesIO(data)) as img:
        return _hash_opened(img, hash_size)


def hash_file(path: Path | str, hash_size: int = 8) -> Hashes:
    """Hashes of an image file; the one function every step uses, so hashes always agree."""
    with Image.open(path) as img:
        return _hash_opened(img, hash_size)


def _hash_opened(img: Image.Image, hash_size: int) -> Hashes:
    if img.format == "JPEG":
        side = max(256, hash_size * 16)
        img.draft("RGB", (side, side))
    img.load()
    return image_hashes(img, hash_size)


def pack(hex_hashes: Sequence[str], hash_size: int) -> np.ndarray:
    """Hex hashes -> (n, words) uint64 array (zero padded to whole words; padding never differs)."""
    nbytes = hash_nbytes(hash_size)
    words = (nbytes + 7) // 8
    bad = next((h for h in hex_hashes if not isinstance(h, str) or len(h) != 2 * nbytes), None)
    if bad is not None:
        raise ValueError(f"hash {bad!r} is not a {hash_size}x{hash_size}-bit hex hash")
    raw = np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=np.uint8).reshape(len(hex_hashes), nbytes)
    buf = np.zeros((len(hex_hashes), words * 8), dtype=np.uint8)
    buf[:, :nbytes] = raw
    return buf.view(np.uint64)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes of the same size."""
    ra, rb = bytes.fromhex(a), bytes.fromhex(b)
    if len(ra) != len(rb):
        raise ValueError("hashes of different sizes")
    return (int.from_bytes(ra, "big") ^ int.from_bytes(rb, "big")).bit_count()


if hasattr(np, "bitwise_count"):  # numpy >= 2

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)

    def _popcount_into(x: np.ndarray, out: np.ndarray) -> None:
        np.bitwise_count(x, out=out)

else:  # pragma: no cover - numpy 1.x fallback: a byte lookup table
    _TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _TABLE[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)

    def _popcount_into(x: np.ndarray, out: np.ndarray) -> None:
        out[:] = _popcount(x)


def distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(q, n) Hamming distances between packed (rows, words) uint64 hashes: XOR + popcount."""
    if gallery.shape[1] == 1:  # 64-bit hashes: one word, nothing to reduce
        return _popcount(queries[:, :1] ^ gallery[:, 0][None, :]).astype(np.int32)
    return _popcount(queries[:, None, :] ^ gallery[None, :, :]).sum(axis=-1, dtype=np.int32)


def _check_shas(shas: Sequence[str]) -> None:
    """All lowercase 64-hex-digit strings (checked in bulk: galleries can be large)."""
    try:
        joined = "".join(shas)
        ok = (all(len(s) == 64 for s in shas) and joined == joined.lower()
              and len(bytes.fromhex(joined)) == 32 * len(shas))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bad = next((s for s in shas if not isinstance(s, str) or not _SHA_RE.match(s)), shas)
        raise ValueError(f"not a lowercase hex sha256: {bad!r}")


# ---- the gallery index ----------------------------------------------------------------
class GalleryIndex:
    """Packed pHashes (and mirrored pHashes) of every gallery image, searchable at once.

    Entries are keyed by sha256 (adding one twice is a no-op) and may carry an *origin*,
    the candidate id an image was published from, so rescoring that candidate's hour can
    ignore the copy of itself that it put into the gallery.
    """

    def __init__(self, hash_size: int = 8) -> None:
        if hash_size < 4:
            raise ValueError(f"hash_size must be >= 4, got {hash_size}")
        self.hash_size = hash_size
        self.words = (hash_nbytes(hash_size) + 7) // 8
        # Word-major (words, capacity): each word of every entry is one contiguous run, so a
        # scan is a few whole-array XOR + popcount passes into preallocated buffers.
        self._ph = np.zeros((self.words, 0), dtype=np.uint64)
        self._mi = np.zeros((self.words, 0), dtype=np.uint64)
        self._dtype = np.uint8 if hash_bits(hash_size) <= 255 else np.uint16
        self._buffers: tuple[np.ndarray, ...] | None = None
        self._n = 0
        self._shas: list[str] = []
        self._origins: list[str | None] = []
        self._pos: dict[str, int] = {}
        # Gallery images without hashes (undecodable by PIL): exact sha256 matches only.
        self._unhashed: dict[str, str | None] = {}

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[Any], hash_size: int = 8) -> GalleryIndex:
        """Build from (sha256, phash, phash_mirror[, origin]) tuples or dicts with those keys."""
        index = cls(hash_size)
        shas, phs, mis, origins = [], [], [], []
        for row in rows:
            if isinstance(row, dict):
                sha, ph, mi = row["sha256"], row["phash"], row["phash_mirror"]
                origin = row.get("origin", row.get("candidate_id"))
            else:
                sha, ph, mi, *rest = row
                origin = rest[0] if rest else None
            if not ph or not mi:
                index.add_unhashed(sha, origin)
                continue
            shas.append(sha)
            phs.append(ph)
            mis.append(mi)
            origins.append(origin)
        index.add_many(shas, phs, mis, origins)
        return index

    @staticmethod
    def path_for(settings: Settings) -> Path:
        """Where the published index lives: beside the warehouse's state, not in the user's gallery."""
        return settings.state_dir / "gallery-index.npz"

    @classmethod
    def load_or_empty(cls, settings: Settings) -> GalleryIndex:
        """The persisted index, or an empty one before the gallery exists."""
        path = cls.path_for(settings)
        if not path.exists():
            return cls(settings.phash_size)
        index = cls.load(path)
        if index.hash_size != settings.phash_size:
            raise ValueError(
                f"{path} holds {index.hash_size}x{index.hash_size}-bit hashes but MINING_PHASH_SIZE="
                f"{settings.phash_size}: rehash the gallery (or set the size back) before deduping")
        return index

    # -- size and content ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._pos or sha256 in self._unhashed

    @property
    def shas(self) -> list[str]:
        return list(self._shas)

    def sha256s(self, excluding_origins: Iterable[str] | None = None) -> set[str]:
        """Every gallery sha256, minus those that came from the given candidate ids."""
        skip = set(excluding_origins or ())
        pairs = [*zip(self._shas, self._origins, strict=True), *self._unhashed.items()]
        return {s for s, o in pairs if o is None or o not in skip}

    def sha_at(self, position: int) -> str:
        return self._shas[position]

    def origin(self, sha256: str) -> str | None:
        if sha256 in self._unhashed:
            return self._unhashed[sha256]
        return self._origins[self._pos[sha256]]

    def phash_of(self, sha256: str) -> Hashes:
        i = self._pos[sha256]
        return self._hex_row(self._ph[:, i]), self._hex_row(self._mi[:, i])

    def _hex_row(self, row: np.ndarray) -> str:
        return np.ascontiguousarray(row).view(np.uint8)[: hash_nbytes(self.hash_size)].tobytes().hex()

    # -- incremental updates -------------------------------------------------------------
    def add_unhashed(self, sha256: str, origin: str | None = None) -> bool:
        """Record an image that has no pHash: it still counts for exact (sha256) matches."""
        _check_shas([sha256])
        if sha256 in self:
            return False
        self._unhashed[sha256] = origin
        return True

    def add(self, sha256: str, phash: str, phash_mirror: str, origin: str | None = None) -> bool:
        """Add one image; False (and no change) when its sha256 is already indexed."""
        return self.add_many([sha256], [phash], [phash_mirror], [origin]) == 1

    def add_many(self, shas: Sequence[str], phashes: Sequence[str], mirrors: Sequence[str],
                 origins: Sequence[str | None] | None = None) -> int:
        """Append new images (amortised O(1) each: capacity doubles); returns how many were new."""
        origins = list(origins) if origins is not None else [None] * len(shas)
        if not (len(shas) == len(phashes) == len(mirrors) == len(origins)):
            raise ValueError("shas, phashes, mirrors and origins differ in length")
        _check_shas(shas)
        first: dict[str, int] = {}
        for i, sha in enumerate(shas):
            if sha not in self._pos:
                first.setdefault(sha, i)
                self._unhashed.pop(sha, None)  # now it has hashes
        keep = list(first.values())
        if not keep:
            return 0
        everything = len(keep) == len(shas)
        ph = pack(phashes if everything else [phashes[i] for i in keep], self.hash_size)
        mi = pack(mirrors if everything else [mirrors[i] for i in keep], self.hash_size)
        need = self._n + len(keep)
        if need > self._ph.shape[1]:
            cap = max(need, 2 * self._ph.shape[1], 64)
            for name in ("_ph", "_mi"):
                grown = np.zeros((self.words, cap), dtype=np.uint64)
                grown[:, : self._n] = getattr(self, name)[:, : self._n]
                setattr(self, name, grown)
            self._buffers = None
        self._ph[:, self._n: need] = ph.T
        self._mi[:, self._n: need] = mi.T
        for j, i in enumerate(keep):
            self._pos[shas[i]] = self._n + j
        self._shas.extend(shas[i] for i in keep)
        self._origins.extend(origins[i] for i in keep)
        self._n = need
        return len(keep)

    # -- search ----------------------------------------------------------------------
    def _mask(self, exclude_shas: Iterable[str] = (), excluding_origins: Iterable[str] | None = None) -> np.ndarray | None:
        idx = [self._pos[s] for s in exclude_shas if s in self._pos]
        if excluding_origins:
            skip = set(excluding_origins)
            idx += [i for i, o in enumerate(self._origins) if o is not None and o in skip]
        if not idx:
            return None
        mask = np.zeros(self._n, dtype=bool)
        mask[idx] = True
        return mask

    def query(self, phashes: Sequence[str] | str, *, exclude_shas: Iterable[str] = (),
              excluding_origins: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each query pHash: (index of the nearest entry, its distance); (-1, bits+1) when empty.

        The distance to an entry is the smaller of the distances to its pHash and to its
        mirrored pHash; ties go to the entry added first (deterministic).
        """
        q = pack([phashes] if isinstance(phashes, str) else list(phashes), self.hash_size)
        worst = hash_bits(self.hash_size) + 1
        best = np.full(q.shape[0], -1, dtype=np.int64)
        dist = np.full(q.shape[0], worst, dtype=np.int32)
        if self._n and q.shape[0]:
            mask = self._mask(exclude_shas, excluding_origins)
            for k in range(q.shape[0]):
                d = self._scan(q[k])
                if mask is not None:
                    d[mask] = np.iinfo(self._dtype).max
                arg = int(d.argmin())
                if mask is None or not mask[arg]:
                    best[k], dist[k] = arg, int(d[arg])
        return best, dist

    def _scan(self, q: np.ndarray) -> np.ndarray:
        """Distances from one packed query to every entry: min over (pHash, mirror), in a reused buffer."""
        n = self._n
        if self._buffers is None or self._buffers[0].shape[0] < n:
            cap = self._ph.shape[1]
            self._buffers = (np.empty(cap, np.uint64), np.empty(cap, np.uint8),
                             np.empty(cap, self._dtype), np.empty(cap, self._dtype))
        xor, cnt, dp, dm = (b[:n] for b in self._buffers)
        for arr, acc in ((self._ph, dp), (self._mi, dm)):
            for w in range(self.words):
                np.bitwise_xor(arr[w, :n], q[w], out=xor)
                if w == 0 and acc.dtype == cnt.dtype:
                    _popcount_into(xor, acc)
                    continue
                _popcount_into(xor, cnt)
                if w == 0:
                    acc[:] = cnt
                else:
                    acc += cnt
        np.minimum(dp, dm, out=dp)
        return dp

    def nearest(self, phash: str, phash_mirror: str | None = None, *, exclude_sha: str | None = None,
                excluding_origins: Iterable[str] | None = None) -> tuple[str, int] | None:
        """(sha256, distance) of the closest gallery image, or None for an empty gallery.

        ``phash_mirror`` is accepted for symmetry only: the entry's stored mirror already
        covers a flipped query.
        """
        best, dist = self.query([phash], exclude_shas=[exclude_sha] if exclude_sha else (),
                                excluding_origins=excluding_origins)
        if best[0] < 0:
            return None
        return self._shas[int(best[0])], int(dist[0])

    # -- persistence -------------------------------------------------------------------
    def save(self, path: Path | str) -> Path:
        """Write the index atomically (temp file, fsync, rename): readers never see half of it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array([INDEX_FORMAT, self.hash_size], dtype=np.int64),
            "phash": self._ph[:, : self._n], "phash_mirror": self._mi[:, : self._n],  # (words, n)
            **_encode_keys("", self._shas, self._origins),
            **_encode_keys("unhashed_", list(self._unhashed), list(self._unhashed.values())),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path | str) -> GalleryIndex:
        with np.load(Path(path), allow_pickle=False) as data:
            fmt, hash_size = (int(x) for x in data["format"])
            if fmt != INDEX_FORMAT:
                raise ValueError(f"{path}: unknown gallery index format {fmt}")
            index = cls(hash_size)
            shas, origins = _decode_keys("", data)
            index._unhashed = dict(zip(*_decode_keys("unhashed_", data), strict=True))
            n = len(shas)
            index._ph = np.ascontiguousarray(data["phash"], dtype=np.uint64).reshape(index.words, n)
            index._mi = np.ascontiguousarray(data["phash_mirror"], dtype=np.uint64).reshape(index.words, n)
        index._n = n
        index._shas = shas
        index._origins = origins
        index._pos = {s: i for i, s in enumerate(shas)}
        return index


def _encode_keys(prefix: str, shas: list[str], origins: list[str | None]) -> dict[str, np.ndarray]:
    """sha256s as raw bytes and optional origin strings as one UTF-8 blob plus offsets (no pickle)."""
    texts = [o or "" for o in origins]
    ends = np.cumsum([len(t.encode()) for t in texts], dtype=np.int64) if texts else np.zeros(0, np.int64)
    return {
        f"{prefix}sha256": np.frombuffer(bytes.fromhex("".join(shas)), dtype=np.uint8).reshape(len(shas), 32),
        f"{prefix}origin_blob": np.frombuffer("".join(texts).encode(), dtype=np.uint8),
        f"{prefix}origin_ends": ends,
        f"{prefix}has_origin": np.array([o is not None for o in origins], dtype=bool),
    }


def _decode_keys(prefix: str, data: Any) -> tuple[list[str], list[str | None]]:
    shas = [row.tobytes().hex() for row in data[f"{prefix}sha256"]]
    blob = data[f"{prefix}origin_blob"].tobytes()
    origins: list[str | None] = []
    start = 0
    for end, present in zip(data[f"{prefix}origin_ends"].tolist(), data[f"{prefix}has_origin"].tolist(),
                            strict=True):
        origins.append(blob[start:end].decode() if present else None)
        start = end
    return shas, origins


# ---- batch dedupe ------------------------------------------------------------------------
@dataclass(frozen=True)
class DedupeResult:
    """One batch item's verdict; ``duplicate_of`` is None for an image to keep."""

    sha256: str
    duplicate_of: str | None = None  # sha256 of the gallery image or earlier batch item
    distance: int | None = None  # Hamming bits (0 for exact copies)
    in_gallery: bool = False  # matched the gallery (else an earlier item of the batch)
    kind: str | None = None  # "exact" | "perceptual" | None
    batch_index: int | None = None  # position of the earlier batch item it duplicates

    @property
    def is_duplicate(self) -> bool:
        return self.duplicate_of is not None


def _unpack_item(item: Any) -> tuple[str, str, str]:
    if len(item) == 3:
        return item[0], item[1], item[2]
    sha, (ph, mi) = item
    return sha, ph, mi


def dedupe_batch(items: Sequence[Any], index: GalleryIndex, max_distance: int,
                 excluding_origins: Iterable[str] | None = None) -> list[DedupeResult]:
    """Verdicts for ``items`` ((sha256, (phash, mirror)) or (sha256, phash, mirror)), in order.

    Exact sha256 first (gallery, then earlier items), then pHash against the gallery, then
    against the batch's earlier *kept* items, as if they were published one by one: the
    caller's order decides who wins, so pass a stable one (score sorts by candidate id).
    ``excluding_origins`` hides gallery entries published from those candidates (reruns).
    """
    parsed = [_unpack_item(it) for it in items]
    skip = set(excluding_origins or ())
    gallery_shas = index.sha256s(excluding_origins=skip) if skip else None
    results: list[DedupeResult | None] = [None] * len(parsed)

    first_at: dict[str, int] = {}
    for i, (sha, _, _) in enumerate(parsed):
        if (sha in gallery_shas) if gallery_shas is not None else (sha in index):
            results[i] = DedupeResult(sha, sha, 0, True, "exact")
        elif sha in first_at:
            results[i] = DedupeResult(sha, sha, 0, False, "exact", first_at[sha])
        else:
            first_at[sha] = i

    todo = [i for i, r in enumerate(results) if r is None]
    if todo and len(index):
        best, dist = index.query([parsed[i][1] for i in todo], excluding_origins=skip or None)
        for i, b, d in zip(todo, best.tolist(), dist.tolist(), strict=True):
            if b >= 0 and d <= max_distance:
                results[i] = DedupeResult(parsed[i][0], index.sha_at(b), int(d),
                                          True, "perceptual")

    kept = GalleryIndex(index.hash_size)
    kept_pos: list[int] = []
    for i, (sha, ph, mi) in enumerate(parsed):
        if results[i] is not None:
            continue
        if len(kept):
            best, dist = kept.query([ph])
            if best[0] >= 0 and dist[0] <= max_distance:
                j = kept_pos[int(best[0])]
                results[i] = DedupeResult(sha, parsed[j][0], int(dist[0]), False, "perceptual", j)
                continue
        kept.add(sha, ph, mi)
        kept_pos.append(i)
        results[i] = DedupeResult(sha)
    return [r for r in results if r is not None]
