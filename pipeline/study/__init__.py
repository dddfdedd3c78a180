"""Optuna sweeps (``python -m pipeline.train -m sweep=<name>``): the sweep definition and its
Optuna objects (``definition``), the ask-launch-tell driver (``driver``), what runs inside a
trial's job (``trial``), and the sweep's report and best runs (``summary``)."""
