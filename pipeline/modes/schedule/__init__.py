"""Schedule mode: noise-schedule inspection of the model's scheduler and of reference schedules.

Rooms: ``schedules`` (the math: ᾱ, β, SNR, log-SNR, σ of a schedule; pure, float64), ``mode`` (the
``mode.schedule`` schema and its registration; defaults in ``conf/mode/schedule.yaml``), ``stage`` (the
``schedule`` stage: visited timesteps, flow-model geometry, scalars, findings), ``plots`` (its figures).
"""
