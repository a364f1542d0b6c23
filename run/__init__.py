"""The run lifecycle, between the entry scripts and what they run: composing and checking the config
(``config``, ``checks``), building a run's parts (``build``), checkpoint I/O with one reader and one atomic save
(``checkpoints``), resuming (``resume``), what a run leaves in its folder (``results``), tracking in W&B / MLflow
(``tracking``, ``secrets``), loading a trained run back (``trained``), exporting it (``export``), the reports of an
evaluation (``reports``) and the command-line plumbing of eval / predict / export (``cli``).

A new pre-flight check goes to ``checks``, a new export format to ``export``, a new file a run writes to ``results``.
"""
