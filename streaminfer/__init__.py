"""streaminfer: the thin shell that wires the pipeline (settings, Kafka factory, CLI)."""

__version__ = "0.1.0"
