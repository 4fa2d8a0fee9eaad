"""Loading HF causal LMs; per-family adapters; sites (names <-> modules); hooks to read, add, replace, stop."""

from mri.models.adapters import ADAPTERS, SUPPORTED_MODEL_TYPES, Adapter
from mri.models.model import Model, RunOutput, load, load_tokenizer, parse_dtype
from mri.models.sites import Site, all_site_names, parse_site

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "Model",
    "RunOutput",
    "Site",
    "all_site_names",
    "load",
    "load_tokenizer",
    "parse_dtype",
    "parse_site",
]
