"""After training: measurements of finished runs (``regtune analyze``, ``regtune cam``).

A peer of :mod:`regtune.bench`: it reads run directories (:class:`regtune.train.rundir.RunDir`) and rebuilds each
run's model as it was trained; the measurements themselves live in :mod:`regtune.analysis`.
"""
