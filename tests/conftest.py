"""Shared test fixtures: factories that build adapters and bases in tmp_path."""
