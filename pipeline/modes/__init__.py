"""The analysis modes, one package each with the same rooms: ``mode.py`` (its schema, checks and registration),
``stage.py`` (its stages), ``plots.py`` (its figures) and its math. ``conf/mode/<name>.yaml`` holds its defaults.
"""
