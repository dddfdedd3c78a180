"""The configuration, the bottom layer (it imports no stage): the typed schemas of every config
group and entry point (``schema``, ``app_schema``), the choices a key takes (``choices``), the
errors a user reads (``errors``), and where the configs live and how one is read (``options``).
Import a name from the module that defines it: this package re-exports nothing."""
