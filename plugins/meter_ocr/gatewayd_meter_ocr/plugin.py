"""The ``meter_ocr`` plugin: reads the number on a utility meter from each camera frame.

A frame is a reading with the JPEG/PNG bytes in its ``image`` field (gatewayd makes that field
from an ``image/jpeg`` or ``image/png`` POST, or the node sends it in a CBOR map). Each frame gets
one result::

    {"value": 427.3, "text": "0427.3", "confidence": 0.97, "uncertain": false, "reason": "ok",
     "raw_text": "AQUA | 0427.3 | m³", "model": {"detector": ..., "recognizer": ...},
     "timings": {"decode": ..., "det": ..., "rec": ..., "total": ...}}

When the reading is not certain (low confidence, no number of the configured shape, two
conflicting ones) ``value`` is null, ``uncertain`` is true, ``reason`` says why and ``text`` is
what was seen: the plugin does not guess. A body that is not a decodable image gets an
``error`` result.

The shipped detector is PP-OCRv4's, statically quantized to INT8 by ``make_model.py`` (measured
there and in ``tests/benchmarks/bench_ocr.py``); the recognizer stays FP32 (post-training INT8
read 90.7% vs 97.7% at best; see the README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gatewayd.plugin_api import FieldValue, Plugin, PluginNotReady, Reading, Result
from gatewayd_meter_ocr.reader import DEFAULT_PATTERN, MeterReader, ReaderOptions

#: The shipped static-INT8 detector, made by make_model.py.
INT8_DETECTOR = "ppocrv4_det_int8.onnx"


class MeterOcrOptions(BaseModel):
    """The ``options`` table of a ``meter_ocr`` plugin entry; see the package README."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "int8" (shipped), "fp32" (rapidocr's PP-OCRv4 detector) or a path to an ONNX detector.
    detector: str = "int8"
    #: "fp32" (rapidocr's PP-OCRv4 recognizer) or a path to an ONNX recognizer.
    recognizer: str = "fp32"
    limit_side_len: int = Field(480, ge=32, le=4096)
    roi: tuple[float, float, float, float] | None = None
    digits: int | tuple[int, int] | None = None
    decimals: int | None = None
    pattern: str = DEFAULT_PATTERN
    min_confidence: float = Field(0.8, ge=0, le=1)
    #: The reading field that holds the frame.
    field: str = "image"


def _model_path(choice: str, packaged: dict[str, str | None]) -> tuple[str | None, str]:
    """(path for ReaderOptions, a name for results) of a detector/recognizer option."""
    if choice in packaged:
        return packaged[choice], choice
    return choice, Path(choice).name


class MeterOcrPlugin(Plugin):
    """Meter reading with PP-OCRv4 (detection INT8, recognition FP32) on onnxruntime."""

    name: ClassVar[str] = "meter_ocr"
    version: ClassVar[str] = "0.1.0"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        try:
            self.settings = MeterOcrOptions.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"meter_ocr plugin: {e}") from None
        s = self.settings
        int8 = str(resources.files("gatewayd_meter_ocr") / "models" / INT8_DETECTOR)
        det_path, det_name = _model_path(s.detector, {"int8": int8, "fp32": None})
        rec_path, rec_name = _model_path(s.recognizer, {"fp32": None})
        self.model = {"detector": f"PP-OCRv4-det-{det_name}", "recognizer": f"PP-OCRv4-rec-{rec_name}"}
        try:
            self.reader_options = ReaderOptions(
                det_model=det_path,
                rec_model=rec_path,
                limit_side_len=s.limit_side_len,
                roi=s.roi,
                digits=s.digits,
                decimals=s.decimals,
                pattern=s.pattern,
                min_confidence=s.min_confidence,
            )
        except ValueError as e:
            raise ValueError(f"meter_ocr plugin: {e}") from None
        self._reader: MeterReader | None = None

    def load(self) -> None:
        """Open both models with ``self.threads`` intra-op threads each."""
        try:
            self._reader = MeterReader(replace(self.reader_options, threads=self.threads))
        except FileNotFoundError as e:  # a model not there (yet): retried with backoff
            raise PluginNotReady(f"meter_ocr plugin: {e}") from None

    def sample(self) -> Sequence[Reading]:
        """One rendered meter frame (the evaluation set's renderer) for the warm-up."""
        from gatewayd_meter_ocr.frames import render

        frame = render("0427.3", "lcd", seed=1)
        fields: dict[str, FieldValue] = {"image": frame.image, "format": frame.fmt}
        return [Reading(id="warmup-0", node="warmup", ts=0.0, fields=fields)]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """Read each frame; regions within a frame are recognised as one batch."""
        if self._reader is None:
            raise RuntimeError("meter_ocr plugin: load() must be called before process()")
        return [self._read(self._reader, r) for r in batch]

    def _read(self, reader: MeterReader, reading: Reading) -> Result:
        image = reading.fields.get(self.settings.field)
        if not isinstance(image, bytes):
            missing = f"no image: field '{self.settings.field}' missing or not bytes"
            return Result(reading.id, {"error": missing, "model": self.model})
        try:
            out = reader.read(image)
        except ValueError as e:  # not a decodable image (truncated inside, corrupt, too large)
            return Result(reading.id, {"error": f"cannot read image: {e}", "model": self.model})
        return Result(
            reading.id,
            {
                "value": out.number,
                "text": out.value if out.value is not None else out.text,
                "confidence": round(out.confidence, 4),
                "uncertain": out.uncertain,
                "reason": out.reason,
                "raw_text": out.text,
                "model": self.model,
                "timings": {k: round(v, 2) for k, v in out.timings.items()},
            },
        )
