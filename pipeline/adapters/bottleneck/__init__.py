"""Bottleneck adapters (Houlsby / Pfeiffer): a down-projection, a non-linearity and an
up-projection added after a sublayer, as a PEFT tuner of our own.

- :mod:`.layout`: placements and target modules per architecture (plain data);
- :mod:`.settings`: ``adapter=bottleneck`` (registered; no torch, no peft);
- :mod:`.tuner`: the PEFT tuner (torch and peft), imported by the settings only to apply or load
  an adapter. It imports nothing from the settings.
"""

from pipeline.adapters.bottleneck import settings  # noqa: F401  (registers adapter=bottleneck)
