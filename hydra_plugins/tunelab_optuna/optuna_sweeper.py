"""``hydra/sweeper=optuna``: the class Hydra instantiates (see ``search.optuna_sweeper``)."""

from search.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """Optuna (TPE) trials as Hydra jobs, the study resumable from its journal file."""
