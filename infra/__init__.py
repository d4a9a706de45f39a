"""Adapters to infrastructure (the broker, the reply channel) behind the interfaces services use."""
