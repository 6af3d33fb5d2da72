"""Images/s of the client's encode-path loading: DALI pipelines vs the torch loader.

    python benchmarks/loaders.py [--images 512] [--size 224] [--out-sizes 32 224]
                                 [--formats jpeg png dicom] [--threads 2] [--epochs 3]
                                 [--device cpu|cuda] [--batch-size 64]

Writes a folder of generated images (smooth structure plus noise, so that JPEG/PNG
sizes are realistic), then times whole epochs of ``make_loader(mode="encode")`` per
loader, format and output size after one warm-up epoch (pipeline build and first
decode are reported apart). ``dicom`` copies pydicom's 128×128 ``CT_small.dcm``.
Prints a table and writes the rows as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smsd.bench.cpu_info import cpu_summary
from smsd.data import ImageSource, loader_statuses, make_loader

SUFFIX = {"jpeg": ".jpg", "png": ".png", "dicom": ".dcm"}


def write_images(root: Path, fmt: str, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder = root / fmt
    if fmt == "dicom":
        from pydicom.data import get_testdata_file

        sample = get_testdata_file("CT_small.dcm")
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        cls = folder / f"c{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"{i:05d}{SUFFIX[fmt]}"
        if fmt == "dicom":
            shutil.copy(sample, path)
            continue
        base = 127 + 100 * np.sin(x / (5 + i % 7) + i)[..., None] * np.cos(y / 9)[..., None]
        rgb = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(path, **({"quality": 90} if fmt == "jpeg" else {}))
    return folder


def time_loader(source: ImageSource, loader: str, out_size: int, args) -> dict:
    start = time.perf_counter()
    ld = make_loader(source, img_size=out_size, in_chans=3, mode="encode", loader=loader,
                     batch_size=args.batch_size, num_threads=args.threads,
                     device=args.device)
    built = time.perf_counter() - start
    n = sum(len(b.indices) for b in ld)  # warm-up epoch
    warm = time.perf_counter() - start - built
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for batch in ld:
            batch.images.sum()  # touch the data, as the head would
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"loader": ld.name, "images": n, "epoch_s": round(median, 4),
            "images_per_s": round(n / median, 1), "build_s": round(built, 3),
            "first_epoch_s": round(warm, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224, help="side of the generated images")
    p.add_argument("--out-sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--formats", nargs="+", choices=tuple(SUFFIX), default=["jpeg", "png"])
    p.add_argument("--loaders", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="smsd-loaders-") as tmp:
        for fmt in args.formats:
            source = ImageSource.from_folder(write_images(Path(tmp), fmt, args.images,
                                                          args.size))
            for out_size in args.out_sizes:
                for loader in args.loaders:
                    row = {"format": fmt, "in_size": 128 if fmt == "dicom" else args.size,
                           "out_size": out_size, **time_loader(source, loader, out_size, args)}
                    rows.append(row)
                    print(f"{fmt:5} {row['in_size']:4}→{out_size:<4} {row['loader']:9} "
                          f"{row['images_per_s']:9.1f} images/s  (epoch {row['epoch_s']:.3f} s,"
                          f" build {row['build_s']:.2f} s, first epoch "
                          f"{row['first_epoch_s']:.2f} s)", flush=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": cpu_summary(), "threads": args.threads,
            "device": args.device, "torch": torch.__version__,
            "loaders": {k: v.detail for k, v in loader_statuses().items()},
            "command": "python benchmarks/loaders.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "results")}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{meta['date'].replace('-', '').replace(':', '')}-loaders-{args.device}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
