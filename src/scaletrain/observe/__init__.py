"""Observability: exporters (Prometheus, TensorBoard, W&B offline), alert
rules and their sinks."""
