"""preflab: preference optimization of language models (DPO and its family) on Hugging Face models."""

__version__ = "0.1.0"
