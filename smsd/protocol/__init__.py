"""The single-round protocol: clients encode once, the server pre-trains, clients fine-tune."""

from .body_io import BodyFileError, load_body, save_body
from .client import Client
from .server import PretrainConfig, PretrainError, RunOptions, Server
from .shard import ShardError, inspect_shard, read_shard, write_shard
from .training import FinetuneConfig, accuracy, train_classifier

__all__ = [
    "BodyFileError",
    "Client",
    "FinetuneConfig",
    "PretrainConfig",
    "PretrainError",
    "RunOptions",
    "Server",
    "ShardError",
    "accuracy",
    "inspect_shard",
    "load_body",
    "read_shard",
    "save_body",
    "train_classifier",
    "write_shard",
]
