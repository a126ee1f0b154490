"""What every stage stands on: the run ``context`` (named artifacts), the stage ``registry``, ``progress`` (shards,
crash points, the run lock), ``distributed`` (which shard a process owns), ``threads`` (the CPU thread policy),
``escape`` (text for each sink) and ``metric_keys`` (the ``<mode>/<name>`` key grammar).

It sits below the modes, which import it, and imports nothing of the project but ``pipeline.errors``.
"""
