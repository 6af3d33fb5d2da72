"""The server side: one encode round, pre-training, one fine-tune round.

1. ``query`` every SuperNode: "encode your data with your own key" (the message holds
   the public model config); each replies with its shard (the one upload).
2. Pre-train the body on all shards (:class:`smsd.protocol.Server`, which validates
   every shard with the project's reader first).
3. ``train`` every SuperNode with the body (the one download); each fine-tunes and
   replies with metrics.

Every message's size is counted as Flower ships it (:func:`~.transfer.message_bytes`)
and logged per node.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SmsdError
from ..protocol.body_io import BODY_FORMAT
from ..protocol.server import RunOptions, Server
from ..protocol.shard import SHARD_FORMAT, count_images
from .config import FederationConfig
from .transfer import message_bytes, pack_file, unpack_file

__all__ = ["FederationError", "FederationResult", "NodeReport", "app", "format_report",
           "make_server_app", "run_protocol"]

log = logging.getLogger("smsd.federation")

Observer = Callable[[str, object], None]


class FederationError(SmsdError, RuntimeError):
    """A SuperNode failed, did not answer in time, or too few connected."""


@dataclass
class NodeReport:
    """What one SuperNode sent and received, as Flower counts it."""

    node_id: int
    partition_id: int | None = None  # simulated SuperNodes only
    uploads: int = 0     # messages that carried a shard
    downloads: int = 0   # messages that carried a body
    messages_up: int = 0
    messages_down: int = 0
    bytes_up: int = 0    # every message from the node, serialized as Flower ships it
    bytes_down: int = 0  # every message to the node
    shard_bytes: int = 0
    body_bytes: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class FederationResult:
    nodes: list[NodeReport]
    pretrain_seconds: float

    def as_dict(self) -> dict:
        return {"pretrain_seconds": self.pretrain_seconds,
                "nodes": [asdict(n) for n in self.nodes]}


def _wait_for_nodes(grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {count} SuperNodes connected "
                                  f"within {wait_s:.0f} s")
        time.sleep(1.0)


def _exchange(grid, messages: dict, reports: dict, what: str, wait_s: float,
              observe: Observer | None) -> dict:
    """Send one message per node, collect one reply per node; count both ways."""
    for node, message in messages.items():
        reports[node].messages_down += 1
        reports[node].bytes_down += message_bytes(message)
        if observe:
            observe("down", message)
    replies = {r.metadata.src_node_id: r
               for r in grid.send_and_receive(list(messages.values()), timeout=wait_s)
               if r.metadata.src_node_id in messages}
    missing = sorted(set(messages) - set(replies))
    if missing:
        raise FederationError(f"SuperNodes {missing} sent no reply to {what} "
                              f"within {wait_s:.0f} s")
    for node, reply in replies.items():
        if observe:
            observe("up", reply)
        if reply.has_error():
            raise FederationError(f"SuperNode {node} failed to {what}: {reply.error.reason}")
        reports[node].messages_up += 1
        reports[node].bytes_up += message_bytes(reply)
    return replies


def run_protocol(grid, config: FederationConfig, *, work_dir: str | Path | None = None,
                 observe: Observer | None = None, progress: bool = False) -> FederationResult:
    """Run the single-round protocol over ``grid``; returns per-node counts and metrics.

    ``observe(direction, message)`` sees every message ("down" to a node, "up" from it).
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    recipe = config.recipe
    server_key = config.server_key()  # a bad key file fails before any node works
    nodes = _wait_for_nodes(grid, config.split.clients, config.wait_s)
    reports = {n: NodeReport(node_id=n) for n in nodes}
    split = ConfigRecord(config.split.to_record())
    log.info("smsd federation: %d SuperNodes %s", len(nodes), nodes)

    query = {n: Message(RecordDict({
        "model": ConfigRecord({"config": recipe.model.to_json()}), "split": split,
        "transfer": ConfigRecord({"chunk-bytes": config.chunk_bytes})}),
        dst_node_id=n, message_type="query") for n in nodes}
    replies = _exchange(grid, query, reports, "encode", config.wait_s, observe)

    with tempfile.TemporaryDirectory(prefix="smsd-superlink-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        shard_paths, recipients = [], {}
        for node in nodes:
            content = replies[node].content
            data = unpack_file(content.get("shard"), content.get("shard.meta"), SHARD_FORMAT,
                               f"SuperNode {node}")
            path = work / f"shard-node{node}.safetensors"
            path.write_bytes(data)
            shard_paths.append(path)
            report = reports[node]
            report.uploads += 1
            report.shard_bytes = len(data)
            site = content.get("site")
            if site is not None and "partition-id" in site:
                report.partition_id = int(site["partition-id"])
            recipients[node] = _recipient(site, node)
            log.info("upload   node %d: shard %d B in %d chunk(s), message %d B", node,
                     len(data), int(content["shard.meta"]["chunks"]), report.bytes_up)

        started = time.perf_counter()
        # One checkpoint, at the end (the SuperLink's work folder is temporary).
        pretrain = recipe.pretrain_for(count_images(shard_paths))
        server = Server(recipe.model, pretrain,
                        options=RunOptions(checkpoint_every=pretrain.epochs),
                        unseal_key=server_key)
        body_path = work / "body.safetensors"
        server.pretrain(shard_paths, out=body_path, work_dir=work / "server",
                        progress=progress)
        pretrain_seconds = time.perf_counter() - started
        bodies = {n: _body_for(body_path, recipients[n], work / f"body-node{n}.sealed")
                  for n in nodes}

    # The clients fine-tune a pre-trained body: the SMSD recipe of `smsd simulate`.
    finetune = ConfigRecord(asdict(recipe.smsd_finetune))
    packed = {n: pack_file(bodies[n], BODY_FORMAT, config.chunk_bytes) for n in nodes}
    train = {n: Message(RecordDict({"body": packed[n][0], "body.meta": packed[n][1],
                                    "finetune": finetune, "split": split}),
                        dst_node_id=n, message_type="train") for n in nodes}
    before = {n: reports[n].bytes_down for n in nodes}
    replies = _exchange(grid, train, reports, "fine-tune", config.wait_s, observe)
    for node in nodes:
        report = reports[node]
        report.downloads += 1
        report.body_bytes = len(bodies[node])
        report.metrics = dict(replies[node].content["metrics"])
        log.info("download node %d: body %d B in %d chunk(s), message %d B; metrics %s",
                 node, len(bodies[node]), int(packed[node][1]["chunks"]),
                 report.bytes_down - before[node],
                 {k: round(v, 4) if isinstance(v, float) else v
                  for k, v in report.metrics.items()})
    ordered = sorted(reports.values(), key=lambda r: (r.partition_id or 0, r.node_id))
    return FederationResult(ordered, pretrain_seconds)


def _recipient(site, node: int):
    """The public key a node sent for its body, or None (then its body goes unsealed)."""
    from ..sealing.keys import RecipientPublicKey

    if site is None or "recipient-public-key" not in site:
        log.warning("SuperNode %d sent no recipient key: its body goes UNSEALED", node)
        return None
    try:
        return RecipientPublicKey(bytes.fromhex(str(site["recipient-public-key"])),
                                  str(site.get("recipient-name", f"node{node}")))
    except ValueError as exc:
        raise FederationError(f"SuperNode {node} sent a malformed recipient key: {exc}") from None


def _body_for(body_path: Path, recipient, sealed_path: Path) -> bytes:
    """The body's bytes for one node: sealed to its key when it sent one."""
    if recipient is None:
        return body_path.read_bytes()
    from ..safe_files import read_header
    from ..sealing.files import seal_file

    seal_file(body_path, sealed_path, [recipient],
              read_header=lambda p: read_header(p, "body file"))
    return sealed_path.read_bytes()


def format_report(result: FederationResult) -> str:
    """One line per SuperNode: transfers, Flower-counted bytes, test accuracy."""
    head = (f"{'node':>20}{'partition':>10}{'uploads':>9}{'downloads':>11}{'bytes up':>12}"
            f"{'bytes down':>12}{'test acc':>10}")
    rows = [head]
    for n in result.nodes:
        acc = n.metrics.get("test_accuracy")
        part = "-" if n.partition_id is None else str(n.partition_id)
        rows.append(f"{n.node_id:>20}{part:>10}{n.uploads:>9}{n.downloads:>11}"
                    f"{n.bytes_up:>12}{n.bytes_down:>12}"
                    f"{'-' if acc is None else f'{100 * acc:.2f}':>10}")
    return "\n".join(rows)


def make_server_app(config: FederationConfig | None = None,
                    on_result: Callable[[FederationResult], None] | None = None,
                    observe: Observer | None = None):
    """The ServerApp. Without ``config`` it reads the run config (``flwr run``)."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        cfg = config or FederationConfig.from_run_config(dict(context.run_config))
        if not logging.getLogger().handlers and not log.handlers:
            # `flwr run` streams this process's output; show the per-node transfer log.
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        result = run_protocol(grid, cfg, observe=observe)
        log.info("%s", format_report(result))
        if on_result is not None:
            on_result(result)

    return server_app


try:
    app = make_server_app()
except ImportError:  # flwr is the optional extra smsd[flower]
    app = None
