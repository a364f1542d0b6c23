"""Hydra finds sweepers only in the ``hydra_plugins`` namespace: tunelab's Optuna sweeper is registered here, its code
lives in ``search/optuna_sweeper.py``."""
