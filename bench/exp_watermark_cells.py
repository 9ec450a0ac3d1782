"""Experiment: a per-cell head on PP-OCRv4's own fused text features, trained with the synthetic mask.

Not part of the product. The shipped detector summarises the text detector's final probability
map; faint marks stay below what that map (trained on real scene text) calls text. The map is
computed from a 96-channel fused feature map at 1/4 resolution; this experiment taps it, pools it
into cells, and learns which cells hold watermark ink, using the exact mask the synthesiser drew.

    python bench/exp_watermark_cells.py extract [PHOTO_DIR] --out /tmp/wmcells
    python bench/exp_watermark_cells.py fit --out /tmp/wmcells
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "photos"
NECK = "p2o.Concat.1"
CELL = 4  # map pixels per cell side (1/4 resolution map -> 16 input pixels)


def tapped_session(det_path: Path, threads: int = 0):
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(det_path))
    m.graph.output.append(onnx.helper.make_tensor_value_info(NECK, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def cell_pool(f: np.ndarray, k: int = CELL) -> np.ndarray:
    """(C, H, W) -> (H/k, W/k, 2C): mean and max per k x k cell."""
    c, h, w = f.shape
    f = f[:, : h // k * k, : w // k * k].reshape(c, h // k, k, w // k, k)
    return np.concatenate([f.mean(axis=(2, 4)), f.max(axis=(2, 4))], axis=0).transpose(1, 2, 0)


def extract(photos: Path, out: Path, long_side: int) -> None:
    from mining.settings import load_settings
    from mining.synth import add_watermark, augment_like_reddit
    from mining.watermark import (
        TextEvidence,
        _file_digest,
        _plan,
        list_images,
        open_for_detection,
        split_files,
    )

    settings = load_settings()
    ev = TextEvidence.from_settings(settings, long_side=long_side)
    sess = tapped_session(ev.mapper.model_path)
    name = sess.get_inputs()[0].name
    files = list_images(photos)
    train_files, held = split_files(files, 0.5, 0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps({"train": [str(f) for f in train_files],
                                                "held": [str(f) for f in held]}))
    t0 = time.perf_counter()
    for i, photo in enumerate(files):
        target = out / f"{photo.stem}.npz"
        if target.exists():
            continue
        digest = _file_digest(photo)
        rng = np.random.default_rng([0, int(digest[:15], 16)])
        base = open_for_detection(photo, 4096)
        arrays: dict[str, np.ndarray] = {}
        metas = []
        for j, (positive, kind, strength) in enumerate(_plan(8, 4, rng)):
            meta = {"label": int(positive)}
            if positive:
                img, wm = add_watermark(base, rng, kind=kind, strength=strength)
                diff = np.abs(np.asarray(img, np.int16) - np.asarray(base, np.int16)).sum(axis=2)
                mask = Image.fromarray(((diff > 6) * 255).astype(np.uint8))
                meta.update(wm)
            else:
                img, mask = base, Image.new("L", base.size, 0)
                meta.update(kind="clean", strength="none")
            img, aug = augment_like_reddit(img, rng)
            meta.update(aug)
            prob, neck = sess.run(None, {name: ev.mapper.det_input(img)})
            p = prob[0, 0]
            text_map = ev.mapper.to_text_map(p)
            reads = ev.reader.features(img, text_map)
            cells = cell_pool(neck[0])
            gh, gw = cells.shape[:2]
            cover = np.asarray(mask.resize((gw, gh), Image.BOX), dtype=np.float32) / 255
            pcell = cell_pool(p[None], CELL * 4)[:gh, :gw, 1]
            arrays[f"cells{j}"] = cells.astype(np.float16)
            arrays[f"cover{j}"] = cover.astype(np.float16)
            arrays[f"pcell{j}"] = pcell.astype(np.float16)
            arrays[f"ev{j}"] = ev.combine(text_map, reads)
            metas.append({k: v for k, v in meta.items() if k in ("label", "kind", "strength", "opacity", "mark",
                                                                  "position", "long_side", "jpeg_quality")})
        np.savez(target, meta=np.asarray(json.dumps(metas)), **arrays)
        print(f"{i + 1}/{len(files)} {photo.name} {time.perf_counter() - t0:.0f}s", flush=True)


def load(out: Path, files: list[str]):
    rows = []
    for f in files:
        z = np.load(out / f"{Path(f).stem}.npz")
        metas = json.loads(str(z["meta"]))
        for j, m in enumerate(metas):
            m["photo"] = Path(f).name
            m["folder"] = Path(f).parent.name
            rows.append((z[f"cells{j}"], z[f"cover{j}"], z[f"pcell{j}"], z[f"ev{j}"], m))
    return rows


def cell_rows(rows, rng, per_image: int = 400, pos_min: float = 0.1):
    xs, ys = [], []
    for cells, cover, _p, _e, _m in rows:
        x = cells.reshape(-1, cells.shape[-1])
        c = cover.reshape(-1).astype(np.float32)
        pos = np.flatnonzero(c >= pos_min)
        neg = np.flatnonzero(c == 0)
        pos = rng.choice(pos, min(len(pos), per_image), replace=False) if len(pos) else pos
        neg = rng.choice(neg, min(len(neg), per_image), replace=False)
        idx = np.concatenate([pos, neg])
        xs.append(x[idx].astype(np.float32))
        ys.append((c[idx] >= pos_min).astype(np.int8))
    return np.concatenate(xs), np.concatenate(ys)


def summary(logit: np.ndarray) -> np.ndarray:
    """Image features from a grid of cell logits."""
    h, w = logit.shape
    flat = np.sort(logit.ravel())[::-1]
    k = lambda n: float(flat[: min(n, len(flat))].mean())  # noqa: E731
    border = np.concatenate([logit[: h // 5].ravel(), logit[-h // 5:].ravel(), logit[:, : w // 5].ravel(),
                             logit[:, -w // 5:].ravel()])
    centre = logit[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    return np.asarray([flat[0], k(3), k(10), k(30), k(100), (logit > 0).mean(), (logit > 2).mean(),
                       border.max(), centre.max(), np.log1p((logit > 0).sum())], dtype=np.float32)


class CellHead:
    def __init__(self, kind: str, seed: int = 0):
        self.kind, self.seed = kind, seed

    def fit(self, x, y):
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        z = self.scaler.transform(x)
        if self.kind == "logistic":
            self.model = LogisticRegression(C=1.0, max_iter=300).fit(z, y)
        else:
            self.model = MLPClassifier((64,), alpha=1e-3, batch_size=512, max_iter=30, early_stopping=True,
                                       random_state=self.seed).fit(z, y)
        return self

    def logits(self, cells: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(cells.reshape(-1, cells.shape[-1]).astype(np.float32))
        p = np.clip(self.model.predict_proba(z)[:, 1], 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p)).reshape(cells.shape[:2])


def fit(out: Path, kind: str) -> None:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    from mining.watermark import calibrate_threshold, fit_head

    split = json.loads((out / "split.json").read_text())
    t0 = time.perf_counter()
    tr, he = load(out, split["train"]), load(out, split["held"])
    print(f"loaded {len(tr)} + {len(he)} examples in {time.perf_counter() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    photos = np.asarray([m["photo"] for *_, m in tr])
    y_tr = np.asarray([m["label"] for *_, m in tr])
    y_he = np.asarray([m["label"] for *_, m in he])
    # out-of-fold cell summaries for the training examples, so the stacker sees honest inputs
    s_tr = np.zeros((len(tr), 10), np.float32)
    for k, (a, b) in enumerate(GroupKFold(5).split(np.zeros(len(tr)), y_tr, photos)):
        x, y = cell_rows([tr[i] for i in a], rng)
        head = CellHead(kind).fit(x, y)
        for i in b:
            s_tr[i] = summary(head.logits(tr[i][0]))
        print(f"fold {k} done {time.perf_counter() - t0:.0f}s", flush=True)
    x, y = cell_rows(tr, rng)
    head = CellHead(kind).fit(x, y)
    s_he = np.stack([summary(head.logits(r[0])) for r in he])
    print(f"cells fitted {time.perf_counter() - t0:.0f}s", flush=True)
    ev_tr = np.stack([r[3] for r in tr])
    ev_he = np.stack([r[3] for r in he])
    res = {}
    for name, a, b in (("cell max", s_tr[:, :1], s_he[:, :1]), ("cell summary", s_tr, s_he),
                       ("text evidence", ev_tr, ev_he),
                       ("evidence + cells", np.hstack([ev_tr, s_tr]), np.hstack([ev_he, s_he]))):
        if a.shape[1] == 1:
            p_he, p_oof = b[:, 0], a[:, 0]
        else:
            p_oof = np.zeros(len(a))
            for tr_i, te_i in GroupKFold(5).split(a, y_tr, photos):
                p_oof[te_i] = fit_head(a[tr_i], y_tr[tr_i]).proba(a[te_i])
            p_he = fit_head(a, y_tr).proba(b)
        thr = calibrate_threshold(p_oof[y_tr == 0], 0.03)
        hit = p_he >= thr
        rec = {}
        for kk in ("corner", "centre", "tiled", "logo"):
            for st in ("faint", "strong"):
                sel = np.asarray([m["kind"] == kk and m["strength"] == st for *_, m in he])
                rec[f"{kk}/{st}"] = round(float(hit[sel].mean()), 2)
        scen = np.asarray([m["label"] == 0 and m["folder"] == "scenery" for *_, m in he])
        res[name] = {"auroc": round(float(roc_auc_score(y_he, p_he)), 4),
                     "fpr": round(float(hit[y_he == 0].mean()), 3), "fpr_scenery": round(float(hit[scen].mean()), 3),
                     "recall": round(float(hit[y_he == 1].mean()), 3), "by": rec}
        print(name, json.dumps(res[name]), flush=True)
    (out / f"result-{kind}.json").write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("extract", "fit"))
    ap.add_argument("--kind", default="logistic")
    ap.add_argument("photos", nargs="?", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/wmcells"))
    ap.add_argument("--long-side", type=int, default=960)
    a = ap.parse_args()
    if a.cmd == "extract":
        extract(a.photos, a.out, a.long_side)
    else:
        fit(a.out, a.kind)


if __name__ == "__main__":
    main()
