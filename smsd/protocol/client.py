"""The client: encode images once (permuted tokens), later fine-tune the returned body."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..crypto import ImageId, PermutationKey
from ..data import Batch
from ..errors import SmsdError
from ..models import PatchHead, ViTBody, ViTConfig, head_fingerprint
from ..ops import masked_sample
from ..sealing.keys import RecipientPublicKey
from .recipe_selection import Candidate, select_finetune
from .shard import write_shard
from .training import FinetuneConfig, TokenClassifier, accuracy, train_classifier

__all__ = ["Client", "add_token_noise"]


def add_token_noise(tokens: torch.Tensor, std: float, seed: int | None = None) -> torch.Tensor:
    """``tokens`` plus i.i.d. Gaussian noise of ``std``; ``seed=None`` uses OS entropy, since
    noise the server could regenerate would protect nothing."""
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    noise = torch.randn(tokens.shape, generator=gen, dtype=torch.float32)
    return tokens + std * noise.to(tokens.device, tokens.dtype)

# A loader from smsd.data.make_loader: batches of images with labels and source indices.
Images = torch.Tensor | Iterable[Batch]


class Client:
    """One data owner.

    Args:
        model_config: the public model config (the head is built from its seed).
        key: this client's secret :class:`~smsd.crypto.PermutationKey`.
        head: optional pre-trained head (e.g. from :func:`~smsd.models.load_pretrained`);
            its fingerprint goes into every shard.
        noise_std: std of the Gaussian noise added to every uploaded token value (a privacy
            mitigation measured by ``smsd audit``; 0 = none). Only the shard gets noise.
        noise_seed: seed of that noise (reproducible runs); ``None`` draws fresh OS entropy.
    """

    def __init__(self, model_config: ViTConfig, key: PermutationKey | None,
                 head: PatchHead | None = None, *, noise_std: float = 0.0,
                 noise_seed: int | None = None) -> None:
        if key is not None and not isinstance(key, PermutationKey):
            raise TypeError(f"key must be a PermutationKey, got {type(key).__name__}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) \
                or not 0 <= noise_std < float("inf"):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.noise_seed = noise_seed
        self.config = model_config
        self.key = key
        self.head = (head or PatchHead(model_config)).eval().requires_grad_(False)
        self.fingerprint = head_fingerprint(self.head)
        self.model: TokenClassifier | None = None

    @torch.no_grad()
    def tokens(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        """Head output with position embedding, in patch order: fp32 ``[n, N, D]``
        (for a loader: in the order of its batches)."""
        if not isinstance(images, torch.Tensor):
            return self._loader_tokens(images)[0]
        if not images.dtype.is_floating_point:
            raise TypeError("images must be a floating-point torch.Tensor [n, C, H, W]")
        if images.shape[0] == 0:
            raise ValueError("images is empty: there is nothing to encode")
        if not torch.isfinite(images).all():
            raise ValueError("images contain non-finite values")
        return torch.cat([self.head(images[i:i + batch_size].float())
                          for i in range(0, images.shape[0], batch_size)])

    @torch.no_grad()
    def _loader_tokens(self, loader: Iterable[Batch], progress: str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens, labels and source indices of one epoch of a loader (a progress bar
        named ``progress`` when given and stderr is a terminal)."""
        if not hasattr(loader, "__iter__") or not hasattr(loader, "source"):
            raise TypeError("images must be a floating-point torch.Tensor [n, C, H, W] or a "
                            f"loader from smsd.data.make_loader, got {type(loader).__name__}")
        from tqdm.auto import tqdm

        device = next(self.head.parameters()).device
        tokens, labels, indices = [], [], []
        total = len(loader) if hasattr(loader, "__len__") else None
        batches = tqdm(loader, total=total, desc=progress, unit="batch",
                       disable=None if progress else True, leave=False)
        for batch in batches:
            tokens.append(self.head(batch.images.to(device, torch.float32)))
            labels.append(batch.labels)
            indices.append(batch.indices)
        if not tokens:
            raise ValueError("the loader yielded no images: there is nothing to encode")
        return torch.cat(tokens), torch.cat(labels), torch.cat(indices)

    @torch.no_grad()
    def encode(self, images: Images, out: str | os.PathLike,
               image_ids: Sequence[ImageId] | None = None, *,
               seal_to: Sequence[RecipientPublicKey] = (), progress: bool = False) -> Path:
        """Embed, permute each image's tokens with the key, and write a shard to ``out``.

        ``image_ids`` (default ``0..n-1``; for a loader, its source's ids) select each
        image's permutation; they stay on the client, the shard does not hold them.
        ``seal_to``: seal the shard to these recipients (the server's public key), so
        that only the training job can read it (:mod:`smsd.sealing`). ``progress``: a
        progress bar over a loader's batches (on a terminal).
        """
        if self.key is None:
            raise ValueError("encode needs the client's permutation key (key=None was given)")
        if isinstance(images, torch.Tensor):
            tokens = self.tokens(images)
        else:
            if image_ids is not None:
                raise ValueError("image_ids must be None with a loader: the ids are its "
                                 "source's (loader.source.ids)")
            tokens, _, indices = self._loader_tokens(images, "encode" if progress else None)
            image_ids = [images.source.ids[i] for i in indices.tolist()]
        n, n_tokens, _ = tokens.shape
        ids = list(range(n)) if image_ids is None else list(image_ids)
        if len(ids) != n:
            raise ValueError(f"image_ids has {len(ids)} ids for {n} images")
        perm = self.key.permutations(ids, n_tokens)
        keep_all = torch.arange(n_tokens).expand(n, n_tokens)
        permuted = masked_sample(tokens, keep_all, perm)  # out[b, j] = tokens[b, perm[b, j]]
        if self.noise_std > 0:
            permuted = add_token_noise(permuted, self.noise_std, self.noise_seed)
        return write_shard(out, permuted, head_fingerprint=self.fingerprint,
                           grid=self.config.grid, seal_to=seal_to)

    @classmethod
    def for_trained(cls, config: ViTConfig, head_fingerprint: str, source: str) -> Client:
        """A keyless client whose seeded head is the one ``source`` (a body or model file
        recording ``head_fingerprint``) was trained on; else SmsdError."""
        client = cls(config, None)
        if head_fingerprint and head_fingerprint != client.fingerprint:
            raise SmsdError(f"{source} was trained on tokens of a different head than this "
                            "model config's seeded head")
        return client

    def _tokens_and_labels(self, images: Images, labels: torch.Tensor | None,
                           progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if labels is None:
                raise TypeError("labels are required with an image tensor")
            return self.tokens(images), labels
        if labels is not None:
            raise ValueError("labels must be None with a loader: its batches carry them")
        tokens, labels, _ = self._loader_tokens(images, progress)
        return tokens, labels

    def finetune(self, body: ViTBody, images: Images, labels: torch.Tensor | None = None, *,
                 num_classes: int, config: FinetuneConfig | None = None,
                 test_images: Images | None = None,
                 test_labels: torch.Tensor | None = None,
                 augment: Iterable[Batch] | None = None,
                 select: Sequence[Candidate] | None = None,
                 own_body: ViTBody | None = None,
                 progress: bool = False) -> dict:
        """Attach a linear classifier to a copy of ``body`` and train on labeled images
        (tokens in patch order; from one epoch of the loader when ``images`` is one,
        ``labels`` then ``None``). The result stays in ``self.model``.

        ``augment``: a ``mode="finetune"`` loader over the same images (random resized
        crop, flip, brightness/contrast...); every epoch then trains on a fresh pass of it,
        embedded by the head. ``images`` still gives the train accuracy (unaugmented).

        ``select``: candidate settings (e.g.
        :data:`~smsd.protocol.recipe_selection.RETURNED_BODY_CANDIDATES`) tried on a
        held-out fifth of the labeled images; the best one then trains on all of them
        (:mod:`smsd.protocol.recipe_selection`). A candidate with ``own_body`` declines
        ``body`` and starts from ``own_body`` (default: a random body of this model config
        drawn from ``config.seed``).

        ``progress``: progress bars while reading images and over the epochs (on a
        terminal).

        Returns metrics: final training loss, train accuracy, with a test set the test
        accuracy, and with ``select`` the choice (``"selection"``).
        """
        config = config or FinetuneConfig()
        if select is not None and augment is not None:
            raise ValueError("select and augment cannot be combined: the held-out images "
                             "would reach training through the augmented loader")
        tokens, labels = self._tokens_and_labels(images, labels,
                                                 "read images" if progress else None)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError("labels must be an int64 torch.Tensor")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), "
                             f"got {int(labels.min())}..{int(labels.max())}")
        selection = None
        if select is not None:
            if own_body is None and any(c.own_body for c in select):
                own_body = ViTBody.seeded(self.config, config.seed)
            config, selection = select_finetune(
                lambda: TokenClassifier.from_body(body, num_classes, seed=config.seed),
                tokens, labels, config, candidates=select,
                new_own_model=lambda: TokenClassifier.from_body(own_body, num_classes,
                                                                seed=config.seed))
            if selection.own_body:
                body = own_body
        self.model = TokenClassifier.from_body(body, num_classes, seed=config.seed)
        epoch_data = None
        if augment is not None:
            def epoch_data(_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
                return self._loader_tokens(augment)[:2]
        history = train_classifier(self.model, tokens, labels, config, epoch_data=epoch_data,
                                   progress=progress)
        metrics: dict = {"train_loss": history[-1],
                         "train_accuracy": accuracy(self.model, tokens, labels)}
        if selection is not None:
            metrics["selection"] = selection.to_dict()
        if test_images is not None and (test_labels is not None
                                        or not isinstance(test_images, torch.Tensor)):
            metrics["test_accuracy"] = self.evaluate(test_images, test_labels)
        return metrics

    def evaluate(self, images: Images, labels: torch.Tensor | None = None) -> float:
        """Accuracy of the fine-tuned model on labeled images (or a loader)."""
        if self.model is None:
            raise ValueError("call finetune before evaluate")
        return accuracy(self.model, *self._tokens_and_labels(images, labels))
