"""The experiment harness over the trainer: ``runner`` (data preparation, jobs, resumable runs),
``compare`` (the command line of examples/experiments.py: scenarios, methods, sweeps), ``results``
(tables and verdicts over seeds) and ``plots``."""
