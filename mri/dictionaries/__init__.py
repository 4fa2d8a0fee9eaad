"""Sparse dictionaries: SAEs, transcoders and cross-layer transcoders; their training, metrics and files.

from mri.dictionaries import DictConfig, TrainConfig, SparseCoder, Trainer, save, load
"""

from mri.dictionaries.clt import CrossLayerTranscoder
from mri.dictionaries.config import ARCHS, KINDS, DictConfig, TrainConfig
from mri.dictionaries.io import export_saelens, import_saelens, load, read_manifest, save
from mri.dictionaries.sparse_coder import ForwardOutput, Latents, SparseCoder
from mri.dictionaries.trainer import Trainer, build

__all__ = [
    "ARCHS",
    "KINDS",
    "CrossLayerTranscoder",
    "DictConfig",
    "ForwardOutput",
    "Latents",
    "SparseCoder",
    "TrainConfig",
    "Trainer",
    "build",
    "export_saelens",
    "import_saelens",
    "load",
    "read_manifest",
    "save",
]
