"""The trainer stage: transformers' Trainer with our guards and its arguments (``build``), the
run's callbacks (``callbacks``), fitting with its base and tuned measurements (``fit``), many
processes and DeepSpeed ZeRO (``distributed``), preemption (``preemption``), peak memory and W&B
(``tracking``), the model-state memory estimate (``memory``), the objective (``objective``) and
the numbers logged at start-up (``startup``)."""
