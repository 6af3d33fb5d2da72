"""Image data for the protocol: image folders, the embedded digits set, non-IID splits,
and batch loaders (DALI or torch) over folders and in-memory arrays."""

from .datasets import Dataset, load_dataset
from .digits import load_digits
from .folder import DataError, load_image_folder
from .loaders import Batch, LoaderSpec, TorchLoader, collect, loader_statuses, make_loader
from .source import ImageSource
from .split import ClientData, DataSplit, dirichlet_split, make_clients
from .transforms import Augment

__all__ = [
    "Augment",
    "Batch",
    "ClientData",
    "DataError",
    "DataSplit",
    "Dataset",
    "ImageSource",
    "LoaderSpec",
    "TorchLoader",
    "collect",
    "dirichlet_split",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "loader_statuses",
    "make_clients",
    "make_loader",
]
