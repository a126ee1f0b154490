"""Recording a run: ``tracking`` (MLflow: the only room that imports it), ``report`` (report.html),
``sweep_summary`` (a sweep's table and plots), ``compare`` (runs side by side) and ``naming`` (run names).
"""
