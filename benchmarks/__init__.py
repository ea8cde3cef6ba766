"""opsd benchmark suite: OPSD training measured against TRL's SDFTTrainer and a naive full-vocabulary step.

Entry point: ``python -m benchmarks.run --suite cpu|gpu|quick``. Every case runs in its own process
(``python -m benchmarks.case KIND --spec JSON --json OUT``) so that peak memory is per case; see README.md.
"""
