"""Observability: where a step's time goes (step_stats), metric sinks (TensorBoard, MLflow,
Prometheus), traces on demand and the one-page run report."""
