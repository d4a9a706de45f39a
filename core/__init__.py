"""The base every layer may import: settings, ids, the clock. It imports nothing of the service."""
