"""The ML work: one file per stage, plus the model and training parts they share.

Nothing here imports ray or mlflow: a stage takes a config, input folders, an output folder
and a `log` callable (see docs/architecture.md).
"""
