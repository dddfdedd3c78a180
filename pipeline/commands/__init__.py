"""What the entry points share, and the only code besides them (and the sweeper plugin) that
handles Hydra's objects: the schemas registered with Hydra (``store``), a composed config turned
into the typed config the stages take (``compose``), the rules across fields checked before any
weights load (``validation``), and how a command ends (``runner``: run folder status, exit code,
where the results are)."""
