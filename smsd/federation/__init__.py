"""Cross-site orchestration of the single-round protocol on Flower (``smsd[flower]``).

``server_app:app`` and ``client_app:app`` are the Flower components (``flwr run .``);
:func:`run_flower_simulation` runs them in Flower's simulation engine. Shards and
bodies travel as chunked safetensors bytes (:mod:`.transfer`), never pickled.
"""

from .config import FederationConfig
from .transfer import DEFAULT_CHUNK_BYTES, TransferError, message_bytes, pack_file, unpack_file

__all__ = ["DEFAULT_CHUNK_BYTES", "FederationConfig", "TransferError", "message_bytes",
           "pack_file", "run_flower_simulation", "unpack_file"]


def __getattr__(name: str):
    if name == "run_flower_simulation":
        from .simulation import run_flower_simulation

        return run_flower_simulation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
