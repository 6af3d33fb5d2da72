"""Quick probe of masked sampling distillation on the demo: pre-train only, then a kNN
and a linear probe on CLS features (labeled images of all clients → their test images),
optionally each client's fine-tune (SMSD vs fine-tune only, the simulate recipe).

    PYTHONPATH=. python scripts/probe_pretrain.py --epochs 12 --koleo 0.1 --patch-gain 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from smsd.experiments import SimulateConfig
from smsd.experiments.methods import initial_body
from smsd.protocol.client import Client
from smsd.protocol.server import Server
from smsd.protocol.training import TokenClassifier, accuracy, train_classifier


@torch.no_grad()
def cls_features(body, tokens: torch.Tensor) -> np.ndarray:
    body.eval()
    return torch.cat([body(tokens[i:i + 256].float()) for i in range(0, len(tokens), 256)]).numpy()


def probes(body, train_t, train_y, test_t, test_y) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    a, b = cls_features(body, train_t), cls_features(body, test_t)
    a_n = a / np.linalg.norm(a, axis=1, keepdims=True)
    b_n = b / np.linalg.norm(b, axis=1, keepdims=True)
    knn = KNeighborsClassifier(10).fit(a_n, train_y).score(b_n, test_y)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    lin = LogisticRegression(max_iter=2000).fit((a - mu) / sd, train_y).score((b - mu) / sd, test_y)
    return {"knn": round(100 * knn, 2), "linear": round(100 * lin, 2),
            "spread": round(float(a.std(0).mean() / np.linalg.norm(a, axis=1).mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4 * 64 / 256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--momentum", type=float, default=0.996)
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--teacher-temp", type=float, default=0.04)
    p.add_argument("--student-temp", type=float, default=0.1)
    p.add_argument("--koleo", type=float, default=0.0)
    p.add_argument("--local", type=int, default=8)
    p.add_argument("--local-keep", type=float, default=0.2)
    p.add_argument("--global-keep", type=float, default=0.5)
    p.add_argument("--patch-gain", type=float, default=1.0)
    p.add_argument("--pos-scale", type=float, default=1.0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--body-lr-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--finetune", action="store_true", help="also fine-tune every client")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = SimulateConfig()
    model = base.recipe.model.replace(patch_embed_gain=args.patch_gain,
                                      pos_embed_scale=args.pos_scale, init_std=args.init_std)
    pre = replace(base.recipe.pretrain, epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                  warmup_epochs=args.warmup, momentum_teacher=args.momentum,
                  out_dim=args.out_dim, teacher_temp=args.teacher_temp,
                  warmup_teacher_temp=min(args.teacher_temp, 0.04),
                  student_temp=args.student_temp, koleo_weight=args.koleo,
                  global_keep=(args.global_keep,) * 2, local_keep=(args.local_keep,) * args.local)
    finetune = replace(base.recipe.finetune, body_lr_scale=args.body_lr_scale)
    cfg = replace(base, recipe=replace(base.recipe, model=model, pretrain=pre,
                                       finetune=finetune))
    data, ncls, _ = cfg.split.load(img_size=model.img_size, in_chans=model.in_chans)
    probe = Client(model, None)
    lab_t = torch.cat([probe.tokens(d.labeled_images) for d in data])
    lab_y = torch.cat([d.labeled_labels for d in data]).numpy()
    test_t = torch.cat([probe.tokens(d.test_images) for d in data])
    test_y = torch.cat([d.test_labels for d in data]).numpy()
    init = initial_body(cfg)
    result = {"tag": args.tag, **vars(args), "init": probes(init, lab_t, lab_y, test_t, test_y)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        clients = [Client(model, cfg.split.client_key(i)) for i in range(len(data))]
        shards = [c.encode(d.train_images, Path(tmp) / f"c{i}.safetensors")
                  for i, (c, d) in enumerate(zip(clients, data, strict=True))]
        server = Server(model, pre, head_fingerprint=clients[0].fingerprint)
        body = server.pretrain(shards, progress=False)
    result["pretrain_s"] = round(time.perf_counter() - start, 1)
    result["loss"] = [round(h["loss"], 3) for h in server.history]
    result["after"] = probes(body, lab_t, lab_y, test_t, test_y)
    if args.finetune:
        for name, b in (("smsd", body), ("ft_only", init)):
            accs = []
            for d in data:
                m = TokenClassifier.from_body(b, ncls, seed=cfg.seed + 1)
                train_classifier(m, probe.tokens(d.labeled_images), d.labeled_labels, finetune)
                accs.append(accuracy(m, probe.tokens(d.test_images), d.test_labels))
            result[name] = round(100 * sum(accs) / len(accs), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
