"""Corpora -> token contexts, and the activation Store (sharded, memory-mapped, atomic, resumable)."""

from mri.data.corpus import iter_documents, tokenize_contexts
from mri.data.reader import ActivationStore, stream_from_model
from mri.data.record import record

__all__ = ["ActivationStore", "iter_documents", "record", "stream_from_model", "tokenize_contexts"]
