"""Domain rules shared by the API and the workers: settings, IDs, storage, job state, events."""
