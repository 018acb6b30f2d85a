"""Orchestration: config, the stage DAG on Ray, MLflow tracking, the CLI.

The only package that imports ray and mlflow; the ML work lives in stages/.
"""
