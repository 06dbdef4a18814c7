"""Datasets and cases: the only part of HIE-Bench that knows file-name patterns."""
