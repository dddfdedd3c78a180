"""The OpenAI-compatible server (``python -m pipeline.serve``): what it serves and how it starts
(``plan``), the models in memory (``pool``), dynamic batching (``engine``), the HTTP app
(``app``), its request and response schemas (``protocol``) and Prometheus counters
(``counters``)."""
