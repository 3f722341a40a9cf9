"""The per-stage modules (models and pure functions)."""
