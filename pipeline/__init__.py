"""Fine-tuning experiments for LLMs, composed with Hydra.

The entry points sit at the top of the package (``python -m pipeline.<name>``): ``train``,
``evaluate``, ``serve``, ``export``, ``report``, ``estimate`` and ``vllm_engine``, plus
``python -m pipeline.data`` (the data preview). Each stage is a subpackage; data flows one way,
from the entry points down: ``commands`` -> ``study`` | ``comparison`` | ``server`` -> ``trainer`` ->
``scoring`` -> ``adapters`` -> ``model`` | ``data`` -> ``runs`` -> ``config`` (the import contracts
in pyproject.toml check it).
"""
