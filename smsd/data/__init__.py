"""Image data for the protocol: image folders, the embedded digits set, non-IID splits."""

from .digits import load_digits
from .folder import DataError, load_image_folder
from .split import ClientData, dirichlet_split, make_clients

__all__ = [
    "ClientData",
    "DataError",
    "dirichlet_split",
    "load_digits",
    "load_image_folder",
    "make_clients",
]
