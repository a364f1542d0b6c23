"""Studies over many runs: a W&B sweep spec run here with W&B's own search engine (``wandb_sweep``, behind
``sweep.py``), the Optuna sweeper Hydra launches trials with (``optuna_sweeper``, registered in ``hydra_plugins/``),
and the tables a multirun ends with (``tables``: one row per job; ``cross_validation``: mean ± std over folds;
``distillation_table``). Each run of a study is an ordinary ``train.py`` run; nothing here trains.
"""
