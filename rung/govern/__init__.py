"""Governance around the model: PII redaction (redact.py), tool-use policy and verification.
Heavy dependencies (Presidio, spaCy) load on first use, not on import."""

from rung.govern.redact import PIIVault, Redaction, Redactor, redact
