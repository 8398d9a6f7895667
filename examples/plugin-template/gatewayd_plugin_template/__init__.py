"""A gatewayd plugin template: the dew point of temperature/humidity readings, on onnxruntime."""
