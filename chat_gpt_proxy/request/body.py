"""A request body as it arrives: size-limited, and decoded when it is gzip or deflate.

Clients may compress what they send (``Content-Encoding: gzip``, RFC 9110
section 8.4). The body is decoded as it arrives and the *decoded* size counts
against ``MAX_BODY_BYTES``, so a small compression bomb is refused after at most
that many bytes were expanded, never expanded whole. Everything after this
point (JSON parsing, the ``ALLOWED_MODELS`` check, forwarding on ``/v1/*``)
sees the decoded body only.
"""

from __future__ import annotations

import re
import zlib

# Content codings we decode, and the zlib window bits for each: gzip framing
# (16 + 15), zlib framing, which is what HTTP calls "deflate" (RFC 9110 section 8.4.1.2).
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
SUPPORTED_ENCODINGS = "gzip, deflate"


class BodyTooLarge(ValueError):
    """The body (as sent, or decoded) is larger than the limit."""


class BodyNotDecodable(ValueError):
    """The body is not valid data in its declared content coding."""


class UnsupportedEncoding(ValueError):
    """A content coding we do not decode (br, zstd, several codings, ...)."""


def content_coding(header: str | None) -> str | None:
    """The coding named by a Content-Encoding header: None for none, a key of DECODERS, or UnsupportedEncoding."""
    coding = (header or "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in DECODERS:
        raise UnsupportedEncoding(coding)
    return coding


class RequestBody:
    """Collects the body's chunks; ``feed`` raises as soon as the body is refused."""

    def __init__(self, limit: int, coding: str | None = None):
        self.limit = limit
        self.received = 0  # bytes as sent
        self.size = 0  # bytes after decoding
        self._parts: list[bytes] = []
        self._coding = coding
        self._decoder = zlib.decompressobj(DECODERS[coding]) if coding else None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limit:
            raise BodyTooLarge()
        if self._decoder is None:
            self._keep(chunk)
            return
        data = chunk
        while data:
            if self._decoder.eof:
                if self._coding == "deflate":
                    raise BodyNotDecodable("data after the end of the compressed stream")
                # A gzip body may be several members, one after the other (RFC 1952 section 2.2).
                self._decoder = zlib.decompressobj(DECODERS[self._coding])
            try:
                # At most one byte more than the limit allows: enough to know it is too large.
                out = self._decoder.decompress(data, self.limit - self.size + 1)
            except zlib.error:
                raise BodyNotDecodable("invalid compressed data") from None
            self._keep(out)
            # What follows the end of a member, if anything, starts the next one.
            data = self._decoder.unused_data if self._decoder.eof else self._decoder.unconsumed_tail

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._parts.clear()
            raise BodyTooLarge()
        if data:
            self._parts.append(data)

    def finish(self) -> bytes:
        """The whole (decoded) body; BodyNotDecodable if the compressed stream was cut short."""
        if self._decoder is not None and self.received and not self._decoder.eof:
            raise BodyNotDecodable("the compressed data ends early")
        return b"".join(self._parts)


# Content-Length is 1*DIGIT, ASCII digits only (RFC 9110 section 8.6):
# str.isdigit() also accepts "\xb2" or Arabic-Indic digits, which int() then
# refuses. Identical repeated values ("5, 5") are allowed, as Tornado does.
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")


def parse_content_length(value: str | None) -> int | None:
    """A Content-Length header's value; None if absent; ValueError if it is not one."""
    if value is None:
        return None
    values = {item.strip() for item in value.split(",")}
    if len(values) != 1:
        raise ValueError("several Content-Length values")
    (single,) = values
    if not CONTENT_LENGTH_RE.fullmatch(single):
        raise ValueError("not a Content-Length")
    return int(single)
