"""The Hydra config tree (a package only so that it installs beside train.py)."""
