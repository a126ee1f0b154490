"""diffusion-lens: a declarative experiment pipeline that analyses pretrained diffusion models."""

__version__ = "0.1.0"
