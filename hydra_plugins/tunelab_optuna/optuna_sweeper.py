"""``hydra/sweeper=optuna``: the class Hydra instantiates (see ``modules.hparams_search``)."""

from modules.hparams_search import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """Optuna (TPE) trials as Hydra jobs, the study resumable from its journal file."""
