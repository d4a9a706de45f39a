"""Pure ML for LLM OS: data checks, base models, the training loop, fine-tuning tasks and prediction.

Nothing here imports the API, database, task or ops layers; they call into this package.
"""
