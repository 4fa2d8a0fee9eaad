"""Corpora -> token contexts, and the activation Store (sharded, memory-mapped, atomic, resumable)."""
