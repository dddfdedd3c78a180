"""The cross-run comparison (``python -m pipeline.report``): runs collected from folders or W&B
(``collect``), grouped into configurations (``grouping``), compared example by example with
paired intervals and retention (``paired``), the Pareto front of quality and cost (``pareto``),
plots (``plots``), and the report's Markdown, CSV, HTML and W&B tables (``page``), written by
``writer``."""
