"""kubetune: fine-tune LLMs from a FineTuneJob manifest, on Kubernetes or locally."""

__version__ = "0.1.0"
