"""Experiment tracking and the model registry (MLflow). Imports go one way, down this list:

params    run params, tags and registry descriptions derived from a recipe and the environment (no MLflow)
datasets  dataset lineage records of a run
store     the local SQLite store after a move (relocate)
client    the MLflow client (HTTP timeouts), store URI and experiment, error kinds
sync      the files beside a run (metrics.jsonl, tracking.json) and their upload (`track sync`)
figures   figures drawn from a run's metrics.jsonl (the loss curve)
uploader  the tracker's background upload thread (bounded queue, back-off when offline)
tracker   the live tracker of a training run (rank 0), never fatal to training
registry  registered adapters, aliases (candidate, champion, previous), verified downloads
"""
