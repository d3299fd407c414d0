"""Client deadlines: how long a client is willing to wait for its answer.

Two ways to give one (the earlier wins when both are given):

* the v2 request parameter ``timeout``: an integer number of **microseconds**, as Triton reads
  it and as ``tritonclient``'s ``infer(..., timeout=...)`` sends it; 0 means no deadline, as
  in Triton. The gateway consumes it: it is not forwarded, and it does not stop the request
  from sharing a batch;
* the HTTP header ``X-Request-Timeout-Ms``: a positive number of milliseconds (fractions
  allowed), for clients that cannot set parameters (msgpack clients, proxies).

A deadline is an absolute time on the gateway's monotonic clock. The gateway answers 504 once it
passes and never sends upstream a request whose deadline has passed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from gateway.errors import BadRequest, shown

HEADER = b"x-request-timeout-ms"
PARAMETER = "timeout"


_NUMBER = re.compile(rb"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")


def from_header(value: bytes, now: float) -> float:
    # A plain decimal number (not Python's float syntax: "1_0", "+5", "inf" are no numbers).
    value = value.strip(b" \t")  # optional whitespace around a field value (RFC 9110 5.5)
    ms = float(value) if _NUMBER.fullmatch(value) else math.nan
    if not (ms > 0 and math.isfinite(ms)):
        raise BadRequest(f"X-Request-Timeout-Ms must be a positive number of milliseconds, got {shown(value.decode('latin-1'))}")
    return now + ms / 1000.0


def from_parameter(value: Any, now: float) -> float | None:
    if type(value) is not int or value < 0:
        raise BadRequest(f"parameter 'timeout' must be a non-negative integer number of microseconds, got {shown(value)}")
    return None if value == 0 else now + value / 1_000_000


def earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
