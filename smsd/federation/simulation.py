"""Flower's simulation engine on one machine: ``smsd simulate --engine flower``.

The ServerApp runs in this process; virtual SuperNodes run the ClientApp in Ray actors
(one CPU each, so nodes take turns on small machines).
"""

from __future__ import annotations

import logging
import os

from ..data import DataSplit
from ..recipe import Recipe
from .config import FederationConfig
from .server_app import FederationResult, Observer, make_server_app
from .transfer import DEFAULT_CHUNK_BYTES

__all__ = ["run_flower_simulation"]

log = logging.getLogger("smsd.federation")


def run_flower_simulation(recipe: Recipe, split: DataSplit, *,
                          chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                          num_cpus: int = 1, observe: Observer | None = None,
                          derived_keys: bool = True) -> FederationResult:
    """Run the protocol on ``split.clients`` virtual SuperNodes (each holding its part of
    ``split``); returns Flower's counts.

    ``derived_keys`` gives each virtual node ``smsd simulate``'s reproducible key
    (derived on the node), so both engines train on the same shards.
    """
    # Flower's telemetry would try the network; nothing here needs it.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Flower's in-memory state store sets up alembic, which logs its plugins at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from flwr.simulation import run_simulation

    from .client_app import make_client_app

    results: list[FederationResult] = []
    server_app = make_server_app(
        FederationConfig(recipe=recipe, split=split, chunk_bytes=chunk_bytes, wait_s=600.0),
        on_result=results.append, observe=observe)
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": num_cpus, "num_gpus": 0,
                                    "include_dashboard": False}}
    flwr_log = logging.getLogger("flwr")
    propagate, flwr_log.propagate = flwr_log.propagate, False  # it has its own handler
    try:
        run_simulation(server_app=server_app,
                       client_app=make_client_app(derived_keys=derived_keys),
                       num_supernodes=split.clients, backend_name="ray",
                       backend_config=backend_config)
    finally:
        flwr_log.propagate = propagate
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return results[0]
