"""The SuperNode side: encode once with this site's own key, later fine-tune the body.

Handlers (Flower's Message API):

* ``@app.query()`` — the server's encode request: embed the local training images,
  permute each image's tokens with this site's key and reply with the shard file.
* ``@app.train()`` — the body comes back: fine-tune on the local labels and reply with
  metrics (train loss/accuracy, test accuracy where a test set exists).

Where the data and the key come from (``flower-supernode --node-config``):

* ``train-dir`` (images to encode), ``labeled-dir`` (default ``train-dir``) and an
  optional ``test-dir``, each ``ROOT/<class>/<image>``; ``key-file`` from
  ``smsd keygen``. Without ``key-file`` a fresh key is generated for the one encode.
* Sealing (:mod:`smsd.sealing`): ``server-public-key`` (the server's ``.pub``, obtained
  out of band or attested) seals the shard to the server; ``recipient-key-file`` (this
  site's ``.key`` from ``smsd keygen --recipient``) sends its public half with the shard,
  so the server seals the body to this site, and opens it. Without them the transfer
  is in the clear, and the node logs so.
* In Flower's simulation engine: the virtual node's ``partition-id`` picks its part of
  the split the server describes (the bundled data set, as ``smsd simulate`` does).

The key is used inside the encode handler only and never enters a message or the
node's context (fine-tuning works on tokens in patch order and needs no key).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..crypto import PermutationKey
from ..errors import SmsdError
from ..protocol.body_io import BODY_FORMAT, load_body
from ..protocol.client import Client
from ..protocol.shard import SHARD_FORMAT
from ..protocol.training import FinetuneConfig
from .transfer import pack_file, unpack_file

__all__ = ["LocalData", "app", "make_client_app"]

log = logging.getLogger("smsd.federation")


@dataclass
class LocalData:
    train_images: torch.Tensor
    image_ids: list
    labeled_images: torch.Tensor
    labeled_labels: torch.Tensor
    num_classes: int
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None


def _partition_id(node_config) -> int | None:
    if "train-dir" in node_config or "partition-id" not in node_config:
        return None
    return int(node_config["partition-id"])


def local_data(node_config, split, model) -> LocalData:
    """This site's images: its folders, or (simulation) its part of the public split."""
    from ..data import DataSplit, load_image_folder

    pid = _partition_id(node_config)
    if pid is not None:
        parts, num_classes, _ = DataSplit.from_record(split).load(img_size=model.img_size,
                                                                  in_chans=model.in_chans)
        if not 0 <= pid < len(parts):
            raise SmsdError(f"partition-id {pid} is outside the {len(parts)}-client split")
        d = parts[pid]
        return LocalData(d.train_images, list(range(d.train_images.shape[0])),
                         d.labeled_images, d.labeled_labels, num_classes,
                         d.test_images, d.test_labels)
    if "train-dir" not in node_config:
        raise SmsdError("this SuperNode has no data: start it with --node-config "
                        "\"train-dir='...' key-file='...'\"")
    root = Path(str(node_config["train-dir"]))
    images, _, _, files = load_image_folder(root, model.img_size, model.in_chans)
    labeled_root = Path(str(node_config.get("labeled-dir", root)))
    lab_images, lab_labels, classes, _ = load_image_folder(labeled_root, model.img_size,
                                                           model.in_chans)
    data = LocalData(images, [str(f.relative_to(root)) for f in files], lab_images,
                     lab_labels, len(classes))
    if "test-dir" in node_config:
        data.test_images, data.test_labels, _, _ = load_image_folder(
            Path(str(node_config["test-dir"])), model.img_size, model.in_chans)
    return data


def _site_key(node_config, split, derived_keys: bool) -> PermutationKey:
    if "key-file" in node_config:
        return PermutationKey.load(str(node_config["key-file"]))
    pid = _partition_id(node_config)
    if derived_keys and pid is not None:
        from ..data import DataSplit

        # The reproducible keys of `smsd simulate` (simulation engine only), derived
        # here on the node; the message only says which split this is.
        return DataSplit.from_record(split).client_key(pid)
    return PermutationKey.generate()


def _encode(message, context, derived_keys: bool):
    from flwr.app import ConfigRecord, Message, RecordDict

    from ..models import ViTConfig

    model = ViTConfig.from_json(str(message.content["model"]["config"]))
    split = message.content["split"]
    chunk_bytes = int(message.content["transfer"]["chunk-bytes"])
    data = local_data(context.node_config, split, model)
    key = _site_key(context.node_config, split, derived_keys)
    seal_to, recipient = _sealing(context.node_config)
    with tempfile.TemporaryDirectory(prefix="smsd-node-") as tmp:
        path = Client(model, key).encode(data.train_images, Path(tmp) / "shard.safetensors",
                                         image_ids=data.image_ids, seal_to=seal_to)
        del key
        shard = path.read_bytes()
    chunks, meta = pack_file(shard, SHARD_FORMAT, chunk_bytes)
    pid = _partition_id(context.node_config)
    site: dict = {} if pid is None else {"partition-id": pid}
    if recipient is not None:  # the public half: the server seals the body to it
        public = recipient.public_key()
        site |= {"recipient-name": public.name, "recipient-public-key": public.raw.hex()}
    site = ConfigRecord(site)
    return Message(RecordDict({"shard": chunks, "shard.meta": meta, "site": site}),
                   reply_to=message)


def _recipient_key(node_config):
    """This site's private recipient key (node config ``recipient-key-file``), or None."""
    from ..sealing.keys import RecipientPrivateKey

    if "recipient-key-file" not in node_config:
        return None
    return RecipientPrivateKey.load(str(node_config["recipient-key-file"]))


def _sealing(node_config):
    """``(server public keys to seal the shard to, this site's recipient key or None)``."""
    from ..sealing.keys import RecipientPublicKey

    seal_to = ([RecipientPublicKey.load(str(node_config["server-public-key"]))]
               if "server-public-key" in node_config else [])
    if not seal_to:
        log.warning("this SuperNode uploads its shard UNSEALED (no server-public-key in its "
                    "node config): whoever runs or stores the SuperLink can read it")
    return seal_to, _recipient_key(node_config)


def _finetune(message, context):
    from flwr.app import Message, MetricRecord, RecordDict

    body_bytes = unpack_file(message.content.get("body"), message.content.get("body.meta"),
                             BODY_FORMAT, "the server")
    ft_record = message.content["finetune"]
    missing = [f.name for f in fields(FinetuneConfig) if f.name not in ft_record]
    if missing:
        raise SmsdError(f"the server's fine-tune config lacks {missing}")
    finetune = FinetuneConfig(**{f.name: ft_record[f.name] for f in fields(FinetuneConfig)})
    with tempfile.TemporaryDirectory(prefix="smsd-node-") as tmp:
        path = Path(tmp) / "body.safetensors"
        path.write_bytes(body_bytes)  # sealed to this site, or the clear body
        body, model, fingerprint = load_body(path, key=_recipient_key(context.node_config))
    client = Client(model, None)
    if fingerprint != client.fingerprint:
        raise SmsdError("the body was trained on tokens of another head than this model "
                        "config's seeded head")
    data = local_data(context.node_config, message.content["split"], model)
    metrics = client.finetune(body, data.labeled_images, data.labeled_labels,
                              num_classes=data.num_classes, config=finetune,
                              test_images=data.test_images, test_labels=data.test_labels)
    metrics["num-labeled"] = int(data.labeled_labels.numel())
    return Message(RecordDict({"metrics": MetricRecord(
        {k: float(v) if isinstance(v, float) else v for k, v in metrics.items()})}),
        reply_to=message)


def make_client_app(*, derived_keys: bool = False):
    """The ClientApp. ``derived_keys`` (simulation engine only, set by the process that
    builds the app, never by a message) makes virtual nodes use ``smsd simulate``'s
    reproducible keys so both engines train on identical shards."""
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    @client_app.query()
    def encode(message, context):
        return _encode(message, context, derived_keys)

    @client_app.train()
    def finetune(message, context):
        return _finetune(message, context)

    return client_app


try:
    app = make_client_app()
except ImportError:  # flwr is the optional extra smsd[flower]
    app = None

