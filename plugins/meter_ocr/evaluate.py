"""Evaluation of the meter reader on the rendered eval set; see gatewayd_meter_ocr.evaluation.

python plugins/meter_ocr/evaluate.py [--n 201] [--limit-side-len 480] [--det-model INT8.onnx] [-v]
"""

from gatewayd_meter_ocr.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
