"""Datasets and what only a dataset knows.

``shapes`` (procedural captioned shapes with masks; ``python -m pipeline.data.shapes.export DIR`` writes it as a
folder) and ``folder`` (real images + captions.jsonl); ``reference`` (the reference set of any kind, one place);
``ground_truth`` (the interface generic stages ask: a judge of generated images, object masks, single-attribute edits;
a mode never compares a dataset's name or kind); ``stages`` (the shared ``reference`` and ``prompts`` stages).
"""
