"""The base model: resolving it to a folder (hub, packaged GGUF, random model at any shape),
describing and loading it (``loading``), 4-bit loads kept correct on every CPU
(``quantization``), and the precision a run trains and measures in (``precision``)."""
