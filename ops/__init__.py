"""LLM OS operations: CLI, embedded servers and process supervision for `llmos up`."""
