"""Governance around the model: tool-use policy (policy.py), answer verification (verify.py), PII redaction."""
