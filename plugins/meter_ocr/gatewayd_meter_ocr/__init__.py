"""gatewayd-meter-ocr: reads utility-meter numbers from camera frames (PP-OCRv4 via rapidocr-onnxruntime)."""

__version__ = "0.1.0"
