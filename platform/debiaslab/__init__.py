"""debiaslab: a Ray-distributed experimentation platform for debiasing diffusion models."""

__version__ = "0.1.0"
