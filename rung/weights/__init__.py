"""Checkpoint readers and per-family key maps. Depends on the model, never the reverse."""
