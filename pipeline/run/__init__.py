"""Running a run: the orchestrator (``runner``: preflight, stages, closing), ``resume`` and ``reproduce``.

The top of the house: it imports the modes, the recording room and the stage primitives; nothing imports it but the
entry points (``pipeline.__main__``).
"""
