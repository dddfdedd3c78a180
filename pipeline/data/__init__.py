"""The data stage: reading sources and their formats (``records``), conversations split and
tokenized with a loss mask (``splits``), padded and packed batches (``packing``), tokenized
splits reused across runs (``cache``), and what will train before any compute (``preview``,
``python -m pipeline.data``)."""
