"""The files of a batch job: input lines in OpenAI's batch format, output records, and the output file that is
appended to, flushed per record, and repaired and read back on a rerun (resume).

    input   {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    answer  {"id": "batch_req_..", "custom_id": "r1", "response": {"status_code": 200, "request_id": "..",
             "body": {chat.completion}}, "error": null}
    refused {"id": .., "custom_id": "r1", "response": {"status_code": 400, "request_id": "..",
             "body": {"error": {server error}}}, "error": {"code": .., "message": .., "line": 7}}
    no request at all (not JSON, no custom_id, a repeated custom_id):
            {"id": .., "custom_id": null, "response": null, "error": {"code": .., "message": .., "line": 7}}

The body is the server's ChatCompletionRequest and the answer body is the chat.completion JSON the server
returns; the checks and media rules are the server's (onevision.server.chat / media), not a copy.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from onevision.server.errors import APIError, InvalidRequest

URL = "/v1/chat/completions"
EXAMPLE = ('{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "onevision", '
           '"messages": [{"role": "user", "content": "Hello"}]}}')


@dataclass
class Request:
    """One input line that is a request: its line number (1-based), custom_id and (unvalidated) body."""

    line: int
    custom_id: str
    body: Any


@dataclass
class LineError:
    """An input line that is no request (custom_id None) or a request refused before it runs."""

    line: int
    custom_id: str | None
    error: APIError


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_line(line: int, raw: bytes) -> Request | LineError:
    """The envelope checks of one line (the body is checked later, by the server's schema and rules)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(line, None, InvalidRequest(
            f"line {line} is not UTF-8 text (byte {e.start}); save the file as UTF-8", code="invalid_encoding"))
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else " (nested too deeply)"
        return LineError(line, None, InvalidRequest(
            f"line {line} is not valid JSON{where}; each line must be one JSON object like {EXAMPLE}",
            code="invalid_json"))
    if not isinstance(obj, dict):
        return LineError(line, None, InvalidRequest(
            f"line {line}: expected a JSON object with custom_id, method, url and body, got {_kind(obj)}",
            code="invalid_line"))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "missing" if "custom_id" not in obj else f"got {_got(custom_id)}"
        return LineError(line, None, InvalidRequest(
            f"line {line}: custom_id: expected a non-empty string that names the request, {what}",
            param="custom_id", code="invalid_custom_id"))
    method, url = obj.get("method", "POST"), obj.get("url", URL)
    if method != "POST":
        return LineError(line, custom_id, InvalidRequest(
            f"method: expected \"POST\", got {_got(method)}", param="method", code="invalid_method"))
    if url != URL:
        return LineError(line, custom_id, InvalidRequest(
            f"url: expected \"{URL}\" (the only endpoint a batch job runs), got {_got(url)}", param="url",
            code="unsupported_url"))
    if "body" not in obj or not isinstance(obj["body"], dict):
        what = "missing" if "body" not in obj else f"got {_kind(obj['body'])}"
        return LineError(line, custom_id, InvalidRequest(
            f"body: expected the chat completion request as an object with model and messages, {what}",
            param="body", code="invalid_body"))
    return Request(line, custom_id, obj["body"])


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line, streamed (media-heavy files never sit in memory whole)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
                raw = raw[3:]
            if raw.strip():
                yield number, raw


# --------------------------------------------------------------------------- records
def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def answer_record(custom_id: str, request_id: str, body: dict) -> dict:
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_record(line: int, custom_id: str | None, error: APIError, request_id: str | None = None) -> dict:
    brief = {"code": error.code or error.type, "message": error.message, "line": line}
    if custom_id is None:  # no request to answer: the line number is how it is found
        return {"id": new_id("batch_req_"), "custom_id": None, "response": None, "error": brief}
    response = {"status_code": error.status, "request_id": request_id or new_id("req-"), "body": error.body()}
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": brief}


def succeeded(record: dict) -> bool:
    response = record.get("response") or {}
    return record.get("error") is None and response.get("status_code") == 200


def dumps(record: dict) -> str:
    # invalid Unicode a client sent (lone surrogates) is escaped rather than failing the write
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- the output file
@dataclass
class Done:
    """What an output file already holds: answered custom_ids and line numbers of request-less error lines,
    each with whether it succeeded."""

    custom_ids: dict[str, bool] = field(default_factory=dict)
    lines: dict[int, bool] = field(default_factory=dict)
    repaired: int = 0  # bytes of a torn last line that were cut off

    def has(self, line: int, custom_id: str | None) -> bool:
        return custom_id in self.custom_ids if custom_id is not None else line in self.lines

    def ok(self, line: int, custom_id: str | None) -> bool:
        return self.custom_ids[custom_id] if custom_id is not None else self.lines[line]


class OutputError(ValueError):
    """The output file can't be resumed (a damaged line that is not the last one)."""


def open_output(path: str | os.PathLike) -> tuple[Done, Any]:
    """Read back the records of a previous run, cut off a torn last line (a run killed mid-write), and open the
    file for appending. -> (what is done, the file opened for appending)."""
    done = Done()
    if os.path.exists(path):
        with open(path, "rb+") as f:  # streamed: the output of a long job can be large
            good = size = 0  # good: end of the last complete record (and its newline)
            for number, raw in enumerate(f, start=1):
                size += len(raw)
                if not raw.endswith(b"\n"):  # the last line, cut short (or only its newline is missing)
                    record = _record(raw) if raw.strip() else None
                    if record is not None:  # complete JSON whose newline was not written: keep it
                        _remember(done, record)
                        f.seek(size)
                        f.write(b"\n")
                        good = size = size + 1
                    break
                if raw.strip():
                    record = _record(raw)
                    if record is None:
                        raise OutputError(f"{os.fspath(path)}: line {number} is not a batch result record, so the "
                                          "file can't be resumed; move the file away (or delete that line) and "
                                          "run again")
                    _remember(done, record)
                good = size
            if good < size:
                done.repaired = size - good
                f.truncate(good)
    return done, open(path, "a", encoding="utf-8")


def _record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "custom_id" not in record or "response" not in record:
        return None
    return record


def _remember(done: Done, record: dict) -> None:
    ok = succeeded(record)
    if record.get("custom_id") is not None:
        done.custom_ids[str(record["custom_id"])] = ok
    elif isinstance(record.get("error"), dict) and isinstance(record["error"].get("line"), int):
        done.lines[record["error"]["line"]] = ok


def write(f, record: dict) -> None:
    f.write(dumps(record) + "\n")
    f.flush()


__all__ = ["Done", "LineError", "OutputError", "Request", "URL", "answer_record", "error_record", "open_output",
           "parse_line", "read_lines", "succeeded", "write"]
