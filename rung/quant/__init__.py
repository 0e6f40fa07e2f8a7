"""Weight formats and the model rewrite that packs a loaded model (see formats.py, rewrite.py)."""
