"""The DeepSpeed backend: the student in a ZeRO 1/2/3 engine, the teacher outside it.

The DeepSpeed JSON and the checks of a run's DeepSpeed settings are ``megadistill.config.deepspeed``'s
(pure: no DeepSpeed import); ``megadistill.deepspeed.backend.DeepSpeedBackend`` is the engine
(imported on demand: this package's ``__init__`` imports neither DeepSpeed nor Megatron).
"""
