"""Datasets: ``shapes`` (procedural captioned shapes with masks) and ``folder`` (real images + captions.jsonl)."""
