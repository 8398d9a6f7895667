"""gatewayd-anomaly: a reference gatewayd plugin that scores pump-node readings with an ONNX autoencoder."""

from gatewayd_anomaly.plugin import AnomalyPlugin

__all__ = ["AnomalyPlugin"]
__version__ = "0.1.0"
