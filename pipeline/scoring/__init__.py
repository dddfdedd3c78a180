"""Measuring a model, without a Trainer: the base and the tuned model on the same examples
(``measurement``), losses (``losses``) and generation (``generation``) with the sets' shared
opening computed once (``prefix``), scores (``metrics``, ``labels``), base measurements reused
across runs (``base_cache``), and vLLM as a generation engine in its own environment
(``vllm_client`` here, ``vllm_worker`` there)."""
