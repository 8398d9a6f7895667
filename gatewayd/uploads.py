"""Block-wise uploads (RFC 7959 Block1): reassembly with the bounds aiocoap's spool lacks.

aiocoap keeps each partial upload for 93-186 s, keeps a *completed* one just as
long, has no cap on how many are open at once, and answers a gap with 5.00. A
camera node's frames are tens of kilobytes, so those copies are what the
gateway's memory is made of. Here an upload lives ``timeout_s`` after its last
block, is freed the moment it completes or is refused, at most ``max_uploads``
are open (a new one beyond that gets 5.03 with Max-Age), and a block that does
not continue its upload is 4.08. The size cap is enforced per block by the
resource (4.13 with Size1) before the block is appended.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiocoap
from aiocoap import blockwise

from gatewayd.errors import Incomplete, Unavailable


class Block1Spool:
    """Reassembles Block1 uploads; drop-in for aiocoap's ``Resource._block1``."""

    def __init__(self, timeout_s: float, max_uploads: int, retry_after_s: int) -> None:
        self.timeout_s = timeout_s
        self.max_uploads = max_uploads
        self.retry_after_s = retry_after_s
        #: block key -> [the request assembled so far, monotonic time of its last block]
        self._open: dict[Any, list[Any]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.expired = 0

    def __len__(self) -> int:
        return len(self._open)

    def buffered_bytes(self) -> int:
        return sum(len(entry[0].payload) for entry in self._open.values())

    def feed_and_take(self, req: aiocoap.Message) -> aiocoap.Message:
        """The whole request once its last block is in; raises 2.31 Continue before that."""
        block1 = req.opt.block1
        if block1 is None:
            return req
        key = blockwise._extract_block_key(req)
        now = time.monotonic()
        if block1.block_number == 0:
            if key not in self._open and len(self._open) >= self.max_uploads:
                self._expire(now)
                if len(self._open) >= self.max_uploads:
                    busy = f"{self.max_uploads} block-wise uploads already open"
                    raise Unavailable(busy, self.retry_after_s, "uploads_full")
            self._open[key] = [req, now]
            self._arm()
        else:
            entry = self._open.get(key)
            if entry is None:
                raise Incomplete(f"block {block1.block_number}: no upload in progress; start at 0")
            try:
                entry[0]._append_request_block(req)
            except ValueError:  # the block does not start where the body ends
                del self._open[key]
                raise Incomplete(
                    f"block {block1.block_number} (byte {block1.start}) does not continue the upload; "
                    "start again at block 0"
                ) from None
            entry[1] = now
        if block1.more:
            raise blockwise.ContinueException(block1)
        taken: aiocoap.Message = self._open.pop(key)[0]
        return taken

    def discard(self, req: aiocoap.Message) -> None:
        """Forget the upload ``req`` belongs to (it was refused)."""
        self._open.pop(blockwise._extract_block_key(req), None)

    def _arm(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.timeout_s / 2, self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep = None
        self._expire(time.monotonic())
        if self._open:
            self._arm()

    def _expire(self, now: float) -> None:
        stale = [k for k, (_, last) in self._open.items() if now - last >= self.timeout_s]
        for k in stale:
            del self._open[k]
        self.expired += len(stale)
