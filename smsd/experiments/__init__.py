"""Experiment harnesses on top of the protocol: ``smsd simulate`` (the protocol against
fine-tune only, FedAvg and centralized training on simulated clients)."""

from .config import SimulateConfig
from .results import MethodResult, format_summary, format_table, summary_rows
from .simulate import simulate, simulate_seeds

__all__ = ["MethodResult", "SimulateConfig", "format_summary", "format_table", "simulate",
           "simulate_seeds", "summary_rows"]
