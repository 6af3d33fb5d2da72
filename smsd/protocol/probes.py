"""Foundation-model probes of a ViT body on frozen CLS features, as DINO reports them.

* k-NN: cosine similarity to the labeled features, the ``k`` nearest vote with weights
  ``exp(similarity / temperature)`` (DINO's ``knn_classifier``: k = 20, T = 0.07).
* linear probe: multinomial logistic regression (scikit-learn) on standardized features.

Both tell apart "pre-training learned nothing" (a random body probes as well) from
"fine-tuning spoiled it" (the body probes well, the fine-tuned model scores worse).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..extras import require

__all__ = ["ProbeScores", "cls_features", "knn_accuracy", "linear_probe_accuracy", "probe"]

KNN_K = 20
KNN_TEMPERATURE = 0.07


@torch.no_grad()
def cls_features(body: torch.nn.Module, tokens: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
    """The body's CLS output for head tokens ``[n, N, D]``: fp32 ``[n, D]``."""
    was_training = body.training
    body.eval()
    try:
        device = next(body.parameters()).device
        return torch.cat([body(tokens[i:i + batch_size].to(device).float()).float().cpu()
                          for i in range(0, tokens.shape[0], batch_size)])
    finally:
        body.train(was_training)


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE) -> float:
    """Accuracy of DINO's weighted k-NN classifier (``k`` is capped at the train size)."""
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError("k-NN needs labeled and test features")
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    similarity, nearest = (test @ train.T).topk(k, dim=1)
    weights = (similarity / temperature).exp()
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(test.shape[0], n_classes).scatter_add_(
        1, train_labels[nearest], weights)
    return float((votes.argmax(1) == test_labels).float().mean())


def linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                          test_labels: torch.Tensor, *, seed: int = 0) -> float:
    """Accuracy of a logistic-regression probe (a single labeled class: that class)."""
    require("data", "sklearn", purpose="the linear probe")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_labels.unique().numel() < 2:
        pred = torch.full_like(test_labels, int(train_labels[0]))
        return float((pred == test_labels).float().mean())
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(train.double().numpy(), train_labels.numpy())
    pred = torch.from_numpy(model.predict(test.double().numpy()))
    return float((pred == test_labels).float().mean())


@dataclass(frozen=True)
class ProbeScores:
    """k-NN and linear-probe accuracy per client (its labeled images -> its test split)
    and pooled (every client's labeled images -> the shared balanced test set)."""

    client_knn: list[float]
    client_linear: list[float]
    pooled_knn: float
    pooled_linear: float

    @property
    def mean_knn(self) -> float:
        return sum(self.client_knn) / len(self.client_knn)

    @property
    def mean_linear(self) -> float:
        return sum(self.client_linear) / len(self.client_linear)

    def to_dict(self) -> dict:
        pct = {k: [round(100 * x, 2) for x in v] if isinstance(v, list) else round(100 * v, 2)
               for k, v in asdict(self).items()}
        return {**pct, "mean_knn": round(100 * self.mean_knn, 2),
                "mean_linear": round(100 * self.mean_linear, 2)}


def probe(body: torch.nn.Module, clients: list[tuple[torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]],
          shared: tuple[torch.Tensor, torch.Tensor], *, linear: bool = True,
          seed: int = 0) -> ProbeScores:
    """Probe ``body`` on ``clients`` = ``[(labeled tokens, labels, test tokens, labels)]``
    and on ``shared`` = ``(tokens, labels)``. ``linear=False`` skips the linear probe
    (reported as NaN)."""
    feats = [(cls_features(body, lt), ly, cls_features(body, tt), ty)
             for lt, ly, tt, ty in clients]
    pooled = (torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]),
              cls_features(body, shared[0]), shared[1])

    def lin(*args) -> float:
        return linear_probe_accuracy(*args, seed=seed) if linear else float("nan")

    return ProbeScores(client_knn=[knn_accuracy(*f) for f in feats],
                       client_linear=[lin(*f) for f in feats],
                       pooled_knn=knn_accuracy(*pooled), pooled_linear=lin(*pooled))
