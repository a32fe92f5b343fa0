"""`regtune tune`: equal-budget hyperparameter search on Optuna, and the tuned comparison of the methods.

`regtune.tune.search` reads search files; `regtune.tune.study` runs the studies (one per cell and method, the same
budget each, resumable, any Optuna storage); `regtune.tune.report` summarises them, re-runs each method's best
configuration on fresh seeds and compares the methods; `regtune.tune.refit` trains the chosen configuration as a
normal run.
"""
