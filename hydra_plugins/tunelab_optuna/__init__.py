"""Hydra finds sweepers only in the ``hydra_plugins`` namespace: tunelab's Optuna sweeper is registered here, its code
lives in ``modules/hparams_search.py``."""
