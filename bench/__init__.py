"""Benchmarks of LLM OS, run as scripts: `python bench/<name>.py`."""
