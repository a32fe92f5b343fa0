"""After training: measurements of finished runs (``regtune analyze``, ``regtune cam``).

A peer of `regtune.bench`: it reads run directories (`regtune.train.rundir.RunDir`) and rebuilds each
run's model as it was trained; the measurements themselves live in `regtune.analysis`.
"""
