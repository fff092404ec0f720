"""The DeepSpeed backend: the student in a ZeRO 1/2/3 engine, the teacher outside it.

``megadistill.deepspeed.config.check`` validates a run's DeepSpeed settings without importing
DeepSpeed; ``megadistill.deepspeed.backend.DeepSpeedBackend`` is the engine (imported on demand:
this package imports neither DeepSpeed nor Megatron).
"""
