"""Reads the number on a utility meter from one camera frame: PP-OCRv4 detection + recognition.

Synchronous and daemon-free: the plugin (or a script) builds a :class:`MeterReader` once and calls
:meth:`MeterReader.read` per frame. The models and their pre/post-processing are rapidocr's
(``TextDetector``/``TextRecognizer``); this module adds decoding, the ROI, the detector's input size,
and the rule that picks the reading out of everything printed on the meter.

Extraction rule (steps 1-6 are :func:`extract`, a pure function; 7-8 are :meth:`MeterReader.finish`):

0. Regions lower than ``min_height_fraction`` (0.5) of the tallest detected one are not recognised.
1. Per recognised region: spaces between digits are dropped, a comma between digits becomes a
   decimal point. No letter is ever turned into a digit (the evaluation gave no case where that
   would have helped: PP-OCRv4 writes the digits of these displays as digits, or is unsure).
2. Regions that are only digits/points and sit side by side on one line (similar height, small
   gap) are joined: the detector gives odometer drums one box each.
3. Every match of ``pattern`` in a region is a candidate; its confidence is the recogniser's lowest
   per-digit probability within the match (the point's counts only when ``decimals`` is not set),
   so one doubtful digit makes the reading doubtful. A match glued to a letter the recogniser also
   uses for digits (``O``, ``B``, ``S``, ``l`` ...) is doubtful as a whole.
4. The reading is the *tallest* numeric text: candidates lower than 0.75x the tallest candidate
   are labels (serial numbers, "IP68", "Qn 2,5"), not the reading.
5. Among the tall candidates, those that fit ``digits``/``decimals`` are kept. When the meter has
   ``decimals`` and an exact ``digits``, a candidate with exactly that many digits and no point
   gets the point at its known place (the small point of 7-segment displays and odometers is often
   not seen); a point in any other place disqualifies the candidate.
6. Exactly one value left, confidence >= ``min_confidence`` and no doubt -> the reading. Otherwise
   ``value`` is None, ``uncertain`` is True and ``reason`` says why; ``text`` keeps what was seen.
7. If 6 failed as "mismatch", "ambiguous", "doubtful_char" or "low_confidence", the row of the
   tallest number is recognised again as one strip across the display (lone drums, red ones most,
   go undetected) and steps 1-6 run on that strip; its reading counts only if it holds all the
   digits first seen, in order ("ok_row"). Those digits count as probable as in either look (two
   looks agree); digits only the strip saw keep the strip's probability.
8. ``verify``, for readings with a 9 (the only digit of the error it is for): the line the reading
   came from is recognised twice more, padded and squeezed; if either sees as many digits but
   different ones, the reading is "unstable" (uncertain).

Digits are ASCII: PP-OCRv4's dictionary also holds full-width digits, which step 1 maps to them.

Known limit: PP-OCRv4 reads a 7-segment 7 drawn with a tail (segments a, b, c, f) as 9, often
with confidence > 0.9. Step 8 catches some of these; the rest are confident wrong reads.
Without ``digits`` and ``decimals`` a missed decimal point or drum cannot be noticed: configure
both for every meter.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

DEFAULT_PATTERN = r"\d+(?:\.\d+)?"
TALL_FRACTION = 0.75  # see rule 4
MAX_PIXELS = 40_000_000  # refuse frames this large before decoding them (a 40 MP frame is 120 MB RGB)
# Letters the PP-OCRv4 recogniser emits for digits it does not see clearly (rule 3).
CONFUSABLE = frozenset("OoDQUuIlLi|!JTtZzEASsGbBgqe")
_NUMERIC_ONLY = re.compile(r"[\d.]+")
_SPACE_IN_NUMBER = re.compile(r"(?<=[\d.])\s+(?=[\d.])")
_DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d)")
# PP-OCRv4's dictionary (Chinese) also holds the full-width digits, which it writes for some drums.
_FULL_WIDTH_DIGITS = {0xFF10 + d: ord("0") + d for d in range(10)}  # U+FF10..FF19 -> "0".."9"
# Outcomes of the first extraction that a re-read of the whole row can fix (see MeterReader.finish).
_ROW_REREAD_REASONS = frozenset({"mismatch", "ambiguous", "doubtful_char", "low_confidence"})

ImageArray = NDArray[np.uint8]


def packaged_model(name: str) -> str:
    return str(resources.files("rapidocr_onnxruntime") / "models" / name)


DEFAULT_DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
DEFAULT_REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"


@dataclass(frozen=True)
class ReaderOptions:
    """How to read one meter (one camera).

    ``det_model`` / ``rec_model``: ONNX paths; None = the FP32 PP-OCRv4 models inside rapidocr.
    ``limit_side_len``: the detector sees the (ROI) image scaled down so that its longer side is at
    most this (never scaled up). Recognition always crops from the full-resolution image.
    ``roi``: fractional box ``(x0, y0, x1, y1)`` of the frame to read; None = whole frame.
    ``digits``: digit positions on the display, exact (``6``) or a range (``(5, 8)``).
    ``decimals``: digits after the decimal point; None = any.
    ``pattern``: regex a reading must match (searched within each region's text).
    ``min_confidence``: lowest per-digit recogniser probability accepted.
    ``threads``: onnxruntime intra-op threads per model.
    ``verify``: re-read the chosen line padded and squeezed if it holds a 9; disagreement ->
    uncertain (rule 8).
    ``min_height_fraction``: detected regions lower than this fraction of the tallest one are not
    recognised (serial numbers, small labels): saves ~20 ms each; 0 recognises everything.
    ``optimize_graphs``: run the models with ``gatewayd.graphopt``'s exact rewrites (faster, same
    outputs up to float rounding); False runs them as published, for comparison.
    """

    det_model: str | None = None
    rec_model: str | None = None
    limit_side_len: int = 480
    roi: tuple[float, float, float, float] | None = None
    digits: int | tuple[int, int] | None = None
    decimals: int | None = None
    pattern: str = DEFAULT_PATTERN
    min_confidence: float = 0.8
    threads: int = 1
    verify: bool = True
    min_height_fraction: float = 0.5
    optimize_graphs: bool = True

    def __post_init__(self) -> None:
        if not 32 <= self.limit_side_len <= 4096:
            raise ValueError("limit_side_len must be in 32..4096")
        if self.roi is not None:
            if len(self.roi) != 4:
                raise ValueError("roi must be (x0, y0, x1, y1)")
            x0, y0, x1, y1 = self.roi
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError("roi must be fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        lo, hi = self.digit_range
        if not 1 <= lo <= hi <= 32:
            raise ValueError("digits must be in 1..32 (and min <= max)")
        if self.decimals is not None and not 0 <= self.decimals < hi:
            raise ValueError("decimals must be >= 0 and fewer than digits")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"bad pattern: {e}") from e
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("min_confidence must be in 0..1")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0.0 <= self.min_height_fraction < TALL_FRACTION:
            raise ValueError(f"min_height_fraction must be in 0..{TALL_FRACTION} (exclusive)")

    @property
    def digit_range(self) -> tuple[int, int]:
        if self.digits is None:
            return (1, 32)
        if isinstance(self.digits, int):
            return (self.digits, self.digits)
        return (self.digits[0], self.digits[1])


Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]


def _box(quad: Quad) -> tuple[float, float, float, float]:
    """Axis-aligned x0, y0, x1, y1 around ``quad``."""
    xs, ys = [p[0] for p in quad], [p[1] for p in quad]
    return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Region:
    """One recognised text region, in pixels of the (ROI-cropped) frame."""

    text: str
    score: float  # recogniser's mean character probability
    char_probs: tuple[float, ...]  # one per character of ``text`` (empty if unknown)
    quad: Quad  # top-left, top-right, bottom-right, bottom-left (the box may be slightly rotated)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Axis-aligned x0, y0, x1, y1."""
        return _box(self.quad)

    @property
    def height(self) -> float:
        """Text line height, measured across the (rotated) box."""
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = self.quad
        return (math.hypot(x3 - x0, y3 - y0) + math.hypot(x2 - x1, y2 - y1)) / 2


@dataclass
class ReadOut:
    value: str | None  # the reading exactly as displayed, e.g. "0427.3"; None when uncertain
    number: float | None
    text: str  # everything recognised, in reading order, " | "-separated (" || " before a row re-read)
    confidence: float  # lowest digit probability of the chosen (or best) candidate; 0 if none
    uncertain: bool
    # "ok", "ok_row" (read from the row re-read), or why not: "no_text", "no_number", "mismatch",
    # "ambiguous", "doubtful_char", "low_confidence", "unstable"
    reason: str
    timings: dict[str, float] = field(default_factory=dict)  # ms: decode, det, rec, [reread], extract, total
    regions: list[Region] = field(default_factory=list)
    quad: Quad | None = None  # where the value was read (ROI pixels); None when uncertain


@dataclass
class Scan:
    """A decoded frame (its ROI, BGR) and what was recognised in it: the expensive part of a read."""

    image: ImageArray
    regions: list[Region]
    timings: dict[str, float]


@dataclass(frozen=True)
class _Candidate:
    value: str
    confidence: float
    height: float
    doubtful: bool
    quad: Quad


class MeterReader:
    """PP-OCRv4 meter reader. Not thread-safe; build one per worker."""

    def __init__(self, options: ReaderOptions | None = None) -> None:
        # Imported here so that importing the module (e.g. for ReaderOptions) stays cheap.
        from rapidocr_onnxruntime import RapidOCR
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

        # Reading order: top to bottom, then left to right within a line (rapidocr's own sort).
        self._sorted_boxes = RapidOCR.sorted_boxes

        self.options = options or ReaderOptions()
        o = self.options
        det_path = o.det_model or packaged_model(DEFAULT_DET_MODEL)
        rec_path = o.rec_model or packaged_model(DEFAULT_REC_MODEL)
        for p in (det_path, rec_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"model not found: {p}")
        threads = {"intra_op_num_threads": o.threads, "inter_op_num_threads": 1}
        with (
            _model_file(det_path, o.optimize_graphs) as (det_file, _),
            _model_file(rec_path, o.optimize_graphs) as (rec_file, _),
        ):
            # rapidocr's own defaults (config.yaml) except: we scale the detector input ourselves, so its
            # "min" resize with a tiny limit never rescales (its "max" mode ignores limit_side_len < 960).
            self._det: Any = TextDetector(
                {
                    "model_path": det_file,
                    "limit_side_len": 32,
                    "limit_type": "min",
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "thresh": 0.3,
                    "box_thresh": 0.5,
                    "max_candidates": 1000,
                    "unclip_ratio": 1.6,
                    "use_dilation": True,
                    "score_mode": "fast",
                    "use_cuda": False,
                    "use_dml": False,
                    **threads,
                }
            )
            self._rec: Any = TextRecognizer(
                {
                    "model_path": rec_file,
                    # Crops padded to at least 320 px wide, as PP-OCRv4 was trained (at each crop's own width
                    # it read 92.7% vs 95.7% of calibration frames right, although twice as fast); one crop
                    # per call: a batch pads every crop to the widest, and on one thread 2 x 320 px took
                    # 56 ms vs 28 ms for one, with the same reads.
                    "rec_img_shape": [3, 48, 320],
                    "rec_batch_num": 1,
                    "use_cuda": False,
                    "use_dml": False,
                    **threads,
                }
            )

    # ---------------------------------------------------------------------------------------------

    def read(self, image: bytes, options: ReaderOptions | None = None) -> ReadOut:
        """Reads the meter in an encoded frame (JPEG/PNG/...). Raises ValueError if it is not an image.

        ``options`` overrides the reader's extraction options (digits, decimals, pattern,
        min_confidence, verify) for this call; its model, threads, limit_side_len, roi and
        min_height_fraction are the reader's (they shape the scan).
        """
        return self.finish(self.scan(image), options)

    def scan(self, image: bytes) -> Scan:
        """Decodes the frame, crops the ROI, detects and recognises all text regions."""
        t0 = time.perf_counter()
        img = self._roi(decode(image))
        t1 = time.perf_counter()
        quads = self._detect(img)
        if quads and self.options.min_height_fraction > 0:
            # Rule 4 ignores short text anyway, and each region costs the recogniser ~20 ms.
            heights = [_quad_height(q) for q in quads]
            floor = self.options.min_height_fraction * max(heights)
            quads = [q for q, h in zip(quads, heights, strict=True) if h >= floor]
        t2 = time.perf_counter()
        regions = self._recognise(img, quads)
        t3 = time.perf_counter()
        return Scan(img, regions, {"decode": (t1 - t0) * 1e3, "det": (t2 - t1) * 1e3, "rec": (t3 - t2) * 1e3})

    def finish(self, scan: Scan, options: ReaderOptions | None = None) -> ReadOut:
        """Extracts the reading from a scan (cheap; a scan can be finished with several options).

        When the regions do not give a reading for a reason a fuller view can fix (a drum or a
        digit left undetected, digits split apart, a letter glued on, a doubtful digit), the row of
        the tallest number is recognised once more as one strip across the display: the detector
        misses lone drums (red ones especially), the recogniser reads the whole strip. The strip's
        reading is taken only if it contains the digits first seen, in order.
        """
        o = options or self.options
        t0 = time.perf_counter()
        timings = dict(scan.timings)
        out = extract(scan.regions, o)
        if out.reason in _ROW_REREAD_REASONS and (seed := _seed_line(scan.regions, o)) is not None:
            t1 = time.perf_counter()
            quad = _row_quad(seed, _direction(scan.regions, seed), o, scan.image.shape[:2])
            row = self._recognise(scan.image, [quad])
            timings["reread"] = (time.perf_counter() - t1) * 1e3
            if row:
                second = extract([_confirmed(row[0], seed)], o)
                seen = (c for c in seed.text if c.isdigit())
                row_digits = iter(second.value or "")
                text = f"{out.text} || {row[0].text}"
                # All digits seen before, in order (``in`` on an iterator consumes it: a subsequence test).
                if second.value is not None and all(d in row_digits for d in seen):
                    out = replace(second, text=text, reason="ok_row")
                else:
                    out = replace(out, text=text)
        # Rule 8 guards against a tailed 7 read as 9: a reading without a 9 cannot be that error.
        if out.value is not None and out.quad is not None and o.verify and "9" in out.value:
            t2 = time.perf_counter()
            stable = self._stable(scan.image, out.quad, out.value, o)
            timings["verify"] = (time.perf_counter() - t2) * 1e3
            if not stable:
                out = replace(out, value=None, number=None, uncertain=True, reason="unstable", quad=None)
        out.regions = list(scan.regions)
        timings["extract"] = (
            (time.perf_counter() - t0) * 1e3 - timings.get("reread", 0.0) - timings.get("verify", 0.0)
        )
        timings["total"] = sum(timings.values())
        out.timings = timings
        return out

    def _stable(self, img: ImageArray, quad: Quad, value: str, o: ReaderOptions) -> bool:
        """Rule 8: the reading's line, recognised again padded and squeezed, gives no other digits.

        PP-OCRv4 reads a 7-segment 7 drawn with a tail (segments a, b, c, f) as 9 with high
        confidence; a second look at the same pixels in a slightly different frame often reads 7.
        """
        crop = _crop(img, np.asarray(quad, dtype=np.float32))
        h, w = crop.shape[:2]
        pad = max(1, h // 4)
        variants = [
            cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
            cv2.resize(crop, (max(1, int(w * 0.75)), h), interpolation=cv2.INTER_AREA),
        ]
        want = value.replace(".", "")
        pattern = re.compile(o.pattern)
        for seen_text, _, _ in self._rec_texts(variants):
            text, _ = _normalise(seen_text, [])
            seen = [m.group().replace(".", "") for m in pattern.finditer(text)]
            # Only another digit in the same place contradicts; a second look that sees less (a
            # dropped digit, a 0 taken for O) is noise, not evidence against the reading.
            if want not in seen and any(len(d) == len(want) for d in seen):
                return False
        return True

    def _recognise(self, img: ImageArray, quads: Sequence[NDArray[np.float32]]) -> list[Region]:
        regions = []
        texts = self._rec_texts([_crop(img, q) for q in quads])
        for q, (text, score, probs) in zip(quads, texts, strict=True):
            if not text.strip():
                continue
            pts = [(float(x), float(y)) for x, y in q]
            regions.append(Region(text, score, probs, (pts[0], pts[1], pts[2], pts[3])))
        return regions

    def _rec_texts(self, crops: Sequence[NDArray[Any]]) -> list[tuple[str, float, tuple[float, ...]]]:
        """Text, mean and per-character probabilities of each crop, from rapidocr's recogniser."""
        if not crops:
            return []
        res, _ = self._rec(list(crops), True)
        out = []
        for r in res:
            text = str(r[0])
            probs: tuple[float, ...] = ()
            if len(r) > 2 and len(r[2]) > 4 and len(r[2][4]) == len(text):
                probs = tuple(float(p) for p in r[2][4])
            out.append((text, float(r[1]), probs))
        return out

    def detector_input(self, image: bytes) -> dict[str, NDArray[np.float32]]:
        """The detector model's input for a frame, as :meth:`read` feeds it (to calibrate a quantized one)."""
        small, _ = self._shrink(self._roi(decode(image)))
        x: NDArray[np.float32] = self._det.get_preprocess(max(small.shape[:2]))(small)
        return {self._det.infer.session.get_inputs()[0].name: x}

    def _roi(self, img: ImageArray) -> ImageArray:
        if self.options.roi is None:
            return img
        h, w = img.shape[:2]
        x0, y0, x1, y1 = self.options.roi
        ox, oy = int(x0 * w), int(y0 * h)
        return img[oy : max(oy + 1, int(y1 * h)), ox : max(ox + 1, int(x1 * w))]

    def _shrink(self, img: ImageArray) -> tuple[ImageArray, float]:
        h, w = img.shape[:2]
        scale = min(1.0, self.options.limit_side_len / max(h, w))
        if scale == 1.0:
            return img, scale
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small: ImageArray = cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(np.uint8, copy=False)
        return small, scale

    def _detect(self, img: ImageArray) -> list[NDArray[np.float32]]:
        small, scale = self._shrink(img)
        boxes, _ = self._det(small)
        if boxes is None or len(boxes) == 0:
            return []
        return list(self._sorted_boxes(np.asarray(boxes, dtype=np.float32) / np.float32(scale)))


def _model_file(path: str, optimize: bool) -> AbstractContextManager[tuple[str, object]]:
    """The model file rapidocr is to load: rewritten by ``gatewayd.graphopt`` unless not to be."""
    from gatewayd import graphopt

    return graphopt.optimized_file(path) if optimize else nullcontext((path, None))


def decode(image: bytes) -> ImageArray:
    """Encoded image -> BGR uint8 array (what the rapidocr models expect). ValueError if not an image."""
    if not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0:
        raise ValueError("empty body: not an image")
    try:
        with Image.open(io.BytesIO(image)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"image too large: {im.width}x{im.height}")
            im.load()
            # Phone/IP cameras may store the frame sideways with an EXIF orientation tag.
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a decodable image: {e}") from e
    return np.asarray(cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR), dtype=np.uint8)


def _quad_height(q: NDArray[np.float32]) -> float:
    return float(np.linalg.norm(q[0] - q[3]) + np.linalg.norm(q[1] - q[2])) / 2


def _crop(img: ImageArray, quad: NDArray[np.float32]) -> ImageArray:
    """The quad's content warped upright (as rapidocr does), from the full-resolution image."""
    w = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    h = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    w, h = max(w, 1), max(h, 1)
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    m = cv2.getPerspectiveTransform(quad.astype(np.float32), dst)
    out = cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.asarray(out, dtype=np.uint8)


# -------------------------------------------------------------------------------------------------
# extraction


def _normalise(text: str, probs: Sequence[float]) -> tuple[str, list[float]]:
    """Rule 1, keeping the per-character probabilities aligned with the characters."""
    text = text.translate(_FULL_WIDTH_DIGITS)
    chars = list(text)
    p = list(probs) if len(probs) == len(text) else [1.0] * len(text)
    keep = [True] * len(chars)
    for m in _SPACE_IN_NUMBER.finditer(text):
        for i in range(m.start(), m.end()):
            keep[i] = False
    for m in _DECIMAL_COMMA.finditer(text):
        chars[m.start()] = "."
    return "".join(c for c, k in zip(chars, keep, strict=True) if k), [
        q for q, k in zip(p, keep, strict=True) if k
    ]


@dataclass
class _Line:
    text: str
    probs: list[float]
    quad: Quad
    height: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return _box(self.quad)


def _join_lines(regions: Sequence[Region]) -> list[_Line]:
    """Rule 2: numeric-only regions side by side on one line become one."""
    lines = []
    for r in regions:
        text, probs = _normalise(r.text.strip(), r.char_probs)
        lines.append(_Line(text, probs, r.quad, r.height))
    numeric = sorted((ln for ln in lines if _NUMERIC_ONLY.fullmatch(ln.text)), key=lambda ln: ln.box[0])
    others = [ln for ln in lines if not _NUMERIC_ONLY.fullmatch(ln.text)]
    joined: list[_Line] = []
    for ln in numeric:
        for j in joined:
            h = max(j.height, ln.height)
            jb, lb = j.box, ln.box
            same_row = abs((jb[1] + jb[3]) / 2 - (lb[1] + lb[3]) / 2) < 0.35 * h
            # A lone drum's box is lower than a box around several drums: allow 2x.
            similar = h <= 2.0 * min(j.height, ln.height)
            near = -0.2 * h < lb[0] - jb[2] < 1.5 * h
            if same_row and similar and near:
                j.text += ln.text
                j.probs += ln.probs
                j.quad = (j.quad[0], ln.quad[1], ln.quad[2], j.quad[3])
                j.height = h
                break
        else:
            joined.append(_Line(ln.text, list(ln.probs), ln.quad, ln.height))
    return joined + others


def _seed_line(regions: Sequence[Region], o: ReaderOptions) -> _Line | None:
    """The tallest line holding a pattern match: where the reading is (rule 4)."""
    pattern = re.compile(o.pattern)
    numeric = [
        ln
        for ln in _join_lines(regions)
        if any(any(c.isdigit() for c in m.group()) for m in pattern.finditer(ln.text))
    ]
    return max(numeric, key=lambda ln: ln.height, default=None)


def _direction(regions: Sequence[Region], seed: _Line) -> NDArray[np.float64]:
    """Unit vector along the text lines: the median slant of the long boxes (a lone drum's box is
    too short to tell), with the seed line itself counted; horizontal if nothing is long enough."""
    quads = [np.asarray(r.quad, dtype=np.float64) for r in regions]
    quads.append(np.asarray(seed.quad, dtype=np.float64))
    angles = []
    for q in quads:
        u = (q[1] - q[0]) + (q[2] - q[3])
        width, height = float(np.linalg.norm(u)) / 2, float(np.linalg.norm((q[3] - q[0]) + (q[2] - q[1]))) / 2
        if width >= 2.5 * height:
            angles.append(math.atan2(u[1], u[0]))
    a = float(np.median(angles)) if angles else 0.0
    return np.array([math.cos(a), math.sin(a)])


def _confirmed(row: Region, seed: _Line) -> Region:
    """The row re-read with each digit that matches a first-seen one, in order, as probable as in
    either look: two looks at the same digit that agree. (The digits the first look missed, mostly
    at the row's ends, where the strip is read with less context, keep the row's own probability.)"""
    if len(row.char_probs) != len(row.text):
        return row
    text, probs = _normalise(row.text, row.char_probs)
    j = 0
    for i, c in enumerate(text):
        while j < len(seed.text) and not seed.text[j].isdigit():
            j += 1
        if j < len(seed.text) and c == seed.text[j]:
            probs[i] = max(probs[i], seed.probs[j])
            j += 1
    return replace(row, text=text, char_probs=tuple(probs))


def _row_quad(
    line: _Line, u: NDArray[np.float64], o: ReaderOptions, shape: tuple[int, ...]
) -> NDArray[np.float32]:
    """A strip through ``line`` along ``u``, long enough for the digits not yet seen on either side."""
    q = np.asarray(line.quad, dtype=np.float64)
    n = np.array([-u[1], u[0]])
    c = q.mean(axis=0)
    along = (q - c) @ u
    seen = max(1, sum(ch.isdigit() for ch in line.text))
    # A lone drum's box is narrower than the drum pitch: assume at least 1.3 line heights per digit.
    pitch = max(float(along.max() - along.min()) / seen, 1.3 * line.height)
    missing = max(0, o.digit_range[0] - seen) if o.digits is not None else 3
    ext = pitch * (missing + 2)
    a, b = float(along.min()) - ext, float(along.max()) + ext
    half = 0.62 * line.height
    pts = np.array([c + a * u - half * n, c + b * u - half * n, c + b * u + half * n, c + a * u + half * n])
    h, w = shape[0], shape[1]
    pts[:, 0] = pts[:, 0].clip(0, w - 1)
    pts[:, 1] = pts[:, 1].clip(0, h - 1)
    return pts.astype(np.float32)


def _fit(value: str, o: ReaderOptions) -> str | None:
    """Rule 5: ``value`` made to fit the meter's digits/decimals, or None if it cannot."""
    n = sum(c.isdigit() for c in value)
    lo, hi = o.digit_range
    if not lo <= n <= hi:
        return None
    if o.decimals is None:
        return value
    if "." in value:
        return value if len(value.split(".")[1]) == o.decimals else None
    if o.decimals == 0:
        return value
    if lo == hi:  # the point's place is known only when the digit count is
        return value[: n - o.decimals] + "." + value[n - o.decimals :]
    return None


def extract(regions: Sequence[Region], options: ReaderOptions) -> ReadOut:
    """Picks the reading out of recognised regions (the module docstring's rule). Pure function."""
    text = " | ".join(r.text for r in regions)
    if not regions:
        return ReadOut(None, None, text, 0.0, True, "no_text", regions=list(regions))
    pattern = re.compile(options.pattern)
    cands: list[_Candidate] = []
    for ln in _join_lines(regions):
        for m in pattern.finditer(ln.text):
            if not any(c.isdigit() for c in m.group()):
                continue
            before = ln.text[m.start() - 1] if m.start() > 0 else ""
            after = ln.text[m.end()] if m.end() < len(ln.text) else ""
            # The point's own probability is often low (a small dot); it only counts when the
            # meter's decimals are not configured, i.e. when the point's place is not known anyway.
            probs = [
                q
                for c, q in zip(m.group(), ln.probs[m.start() : m.end()], strict=True)
                if c.isdigit() or options.decimals is None
            ]
            conf = min(probs, default=0.0)
            cands.append(
                _Candidate(m.group(), conf, ln.height, before in CONFUSABLE or after in CONFUSABLE, ln.quad)
            )
    if not cands:
        return ReadOut(None, None, text, 0.0, True, "no_number", regions=list(regions))
    tallest = max(c.height for c in cands)
    tall = [c for c in cands if c.height >= TALL_FRACTION * tallest]
    fitting = [(v, c) for c in tall if (v := _fit(c.value, options)) is not None]
    best = max(fitting or [(c.value, c) for c in tall], key=lambda vc: vc[1].height)
    conf = best[1].confidence
    if not fitting:
        return ReadOut(None, None, text, conf, True, "mismatch", regions=list(regions))
    if len({v for v, _ in fitting}) > 1:
        return ReadOut(None, None, text, conf, True, "ambiguous", regions=list(regions))
    value = best[0]
    if any(c.doubtful for _, c in fitting):
        return ReadOut(None, None, text, conf, True, "doubtful_char", regions=list(regions))
    conf = min(c.confidence for _, c in fitting)
    if conf < options.min_confidence:
        return ReadOut(None, None, text, conf, True, "low_confidence", regions=list(regions))
    return ReadOut(value, float(value), text, conf, False, "ok", regions=list(regions), quad=best[1].quad)
