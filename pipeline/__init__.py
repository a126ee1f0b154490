"""diffusion-lens: a declarative experiment pipeline that analyses pretrained diffusion models."""

from pipeline.threads import configure_environment as _configure_threads

_configure_threads()  # before torch is imported: see pipeline/threads.py

__version__ = "0.1.0"
