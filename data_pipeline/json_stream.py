"""A top-level JSON array, parsed incrementally from a binary file: never loaded whole, every element accounted.

Real ShareGPT dumps come as one huge JSON array, sometimes cut short or with malformed elements; this reader
yields each element as a record or as an error with its exact byte offset, and keeps going where it can.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterator, NamedTuple

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 64 << 20  # a JSON array element larger than this is reported instead of buffered
READ_CHUNK = 1 << 20
RAW_TEXT_LIMIT = 20_000  # characters of an unparseable element or tail kept in the report

INVALID_JSON = "invalid_json"
TRUNCATED_JSON_ARRAY = "truncated_json_array"
JSON_ELEMENT_TOO_LARGE = "json_element_too_large"
TEXT_AFTER_JSON_ARRAY = "text_after_json_array"
NOT_A_JSON_ARRAY = "not_a_json_array"
# One policy for every JSON input (JSONL lines, array elements): text that is not Unicode is rejected.
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
LONE_SURROGATE = "lone_surrogate"  # a `\ud800`-style escape without its pair: valid JSON, not a character
NESTED_TOO_DEEPLY = "nested_too_deeply"
MAX_DEPTH = 64  # nesting levels of a record (a conversation needs 4); deeper is rejected, never recursed into
_SURROGATE = re.compile("[\\ud800-\\udfff]")


def value_problem(value: Any) -> tuple[str, str] | None:
    """(reason, detail) when a parsed JSON value holds a lone surrogate or is nested over MAX_DEPTH; None when
    it is fine. Iterative, so no depth can exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if m := _SURROGATE.search(value):
                return LONE_SURROGATE, f"U+{ord(m[0]):04X} at character {m.start()} of the string {shorten(value[:200])!r}"
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return NESTED_TOO_DEEPLY, f"nested more than {MAX_DEPTH} levels deep"
            if isinstance(value, dict):
                stack.extend((k, depth) for k in value)
                stack.extend((v, depth + 1) for v in value.values())
            else:
                stack.extend((v, depth + 1) for v in value)
    return None


def printable(text: str) -> str:
    """`text` with lone surrogates (from undecodable bytes or escapes) spelled as `\\udcxx`, so it can be
    written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Element(NamedTuple):
    """One element of the array: its value, or (record None) an error reason with the raw text."""
    record: Any
    number: int  # 1-based element number
    byte_offset: int
    error: str | None = None
    raw: str | None = None


def iter_json_array(f, path: str, chunk_size: int = READ_CHUNK, max_record_bytes: int = MAX_RECORD_BYTES,
                    ) -> Iterator[Element]:
    """Elements of a top-level JSON array, decoded incrementally (`json.JSONDecoder.raw_decode` over a
    sliding buffer). Byte offsets are exact. Every element is yielded, as a record or as an error:

    - an element that is not valid JSON (or unexpected text between elements) → `invalid_json`, and
      reading goes on with the next element. An element's end is found without parsing it: the next
      `,` or `]` outside strings at nesting depth 0, so this resynchronises whenever the bad element's
      quotes pair up and its brackets close (a bad literal or escape, a raw control character, a missing
      `:` or `,`, a stray or mismatched bracket). When they don't (an unterminated string, a missing
      closing bracket), its end can't be told and the rest of the file is reported as below;
    - an element over `max_record_bytes` → `json_element_too_large` (scanned, not buffered), reading
      goes on;
    - an element with bytes that are not UTF-8 → `invalid_utf8`; with a lone surrogate escape →
      `lone_surrogate`; nested over MAX_DEPTH → `nested_too_deeply` (the same policy as for JSONL lines);
    - the file ends inside an element (a cut file) → that tail is reported once as
      `truncated_json_array`, with its byte offset and the start of its text; everything before it is
      yielded normally;
    - text after the array's closing `]` → `text_after_json_array` (once, from its byte offset). It also
      catches an unpaired `"` in an element that made a `]` inside it look like the end of the array.
    Memory stays within about `max_record_bytes` plus a chunk, whatever the file size."""
    reader = _JsonArrayBuffer(f, chunk_size)
    if not reader.skip_whitespace() or reader.peek() != "[":
        yield reader.tail(NOT_A_JSON_ARRAY, 1, "expected '['")
        return
    reader.advance(1)
    number, expect_value = 0, True
    while True:
        if not reader.skip_whitespace():
            log.warning("%s: JSON array ends after element %d without ']'; no element was cut", path, number)
            return
        char = reader.peek()
        if char == "]":  # (after a ',' too: a trailing comma loses nothing)
            reader.advance(1)
            if reader.skip_whitespace():  # (e.g. an unpaired '"' made a ']' inside an element look like the end)
                yield reader.tail(TEXT_AFTER_JSON_ARRAY, number + 1, "text after the array's closing "
                                  "']' (or an element before it has an unpaired '\"' or bracket)")
            return
        if not expect_value and char == ",":
            reader.advance(1)
            expect_value = True
            continue
        number += 1
        value = reader.decode_value(max_record_bytes) if expect_value else None
        if value is not None:
            yield reader.checked(value[0], number, *value[1:])
        else:
            item = reader.scan_element(number, max_record_bytes,
                                       after=None if expect_value else number - 1)
            yield item
            if item.error == TRUNCATED_JSON_ARRAY:
                return
        expect_value = False


_STRUCTURE = re.compile(r'["{}\[\],]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # up to a closing '"' (or a lone trailing '\')


class _JsonArrayBuffer:
    """A text window over a binary file that knows the byte offset of its read position."""

    def __init__(self, f, chunk_size: int):
        import codecs

        self.f, self.chunk_size = f, chunk_size
        # Undecodable bytes become lone surrogates (U+DC80..U+DCFF), which keeps byte offsets exact and lets
        # the element holding them be rejected (`_checked`); no other surrogate can come out of decoding.
        self.utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.byte_pos, self.eof = "", 0, 0, False
        if self.fill() and self.buf.startswith("\ufeff"):
            self.advance(1)

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk_size)
        self.eof = not data
        self.buf = self.buf[self.pos:] + self.utf8.decode(data, final=self.eof)
        self.pos = 0
        return bool(data)

    def advance(self, n: int) -> None:
        self.byte_pos += _byte_length(self.buf[self.pos:self.pos + n])
        self.pos += n

    def peek(self) -> str:
        return self.buf[self.pos]

    def skip_whitespace(self) -> bool:
        """Moves to the next non-whitespace character; False at the end of the file."""
        while True:
            start = self.pos
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            self.byte_pos += self.pos - start  # whitespace is ASCII
            if self.pos < len(self.buf) or not self.fill():
                return self.pos < len(self.buf)

    def decode_value(self, max_bytes: int):
        """The fast path: (value, byte offset, text) of the JSON value at the read position when it is valid, whole
        in the buffer and not over `max_bytes`; None otherwise (then `scan_element` takes it)."""
        try:
            value, end = self.decoder.raw_decode(self.buf, self.pos)
        except (ValueError, RecursionError):
            return None
        if (end == len(self.buf) and not self.eof) or end - self.pos > max_bytes:  # (a number could go on)
            return None
        offset, text = self.byte_pos, self.buf[self.pos:end]
        self.advance(end - self.pos)
        return value, offset, text

    def checked(self, value, number: int, offset: int, text: str) -> Element:
        """The element, or its rejection when its text is not UTF-8 or its value fails `value_problem`."""
        if m := _SURROGATE.search(text):
            at = offset + _byte_length(text[:m.start()])
            return Element(None, number, offset, error=INVALID_UTF8,
                           raw=shorten(text) + f"  [element {number}: byte {at} is not UTF-8]")
        if problem := value_problem(value):
            return Element(None, number, offset, error=problem[0],
                           raw=shorten(text) + f"  [element {number} at byte {offset}: {problem[1]}]")
        return Element(value, number, offset)

    def scan_element(self, number: int, max_bytes: int, after: int | None = None) -> Element:
        """The element at the read position (its record, or an error), found by scanning for
        its end (`iter_json_array`); moves past it. `after`: the number of the element that this text
        follows without a ',' (the text is then reported as it is, not parsed)."""
        offset = self.byte_pos
        length, head, complete = self._scan(max_bytes)
        where = f"element {number} at byte {offset}"
        text = self.buf[self.pos:self.pos + length]
        if not complete:
            self.advance(length)
            return Element(None, number, offset, error=TRUNCATED_JSON_ARRAY,
                           raw=shorten(text if head is None else head) + f"  [the file ends inside {where}]")
        if head is not None:
            self.advance(length)
            return Element(None, number, offset, error=JSON_ELEMENT_TOO_LARGE,
                           raw=printable(head[:RAW_TEXT_LIMIT]) + f"...  [{where} is over {max_bytes} bytes]")
        if after is None:
            try:  # (text after the value, e.g. a missing ',', is left for the next round: as the fast path)
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                note = f"invalid JSON: {e.msg} at character {e.pos - self.pos} of the element"
            except RecursionError:
                self.advance(length)
                return Element(None, number, offset, error=NESTED_TOO_DEEPLY,
                               raw=shorten(text.rstrip()) + f"  [{where}: nested too deeply to parse]")
            except ValueError as e:
                note = f"invalid JSON: {e}"
            else:
                if end - self.pos > max_bytes:
                    self.advance(length)
                    return Element(None, number, offset, error=JSON_ELEMENT_TOO_LARGE,
                                   raw=printable(text[:RAW_TEXT_LIMIT]) + f"...  [{where} is over {max_bytes} bytes]")
                text = self.buf[self.pos:end]
                self.advance(end - self.pos)
                return self.checked(value, number, offset, text)
        else:
            note = f"expected ',' or ']' after element {after}"
        self.advance(length)
        return Element(None, number, offset, error=INVALID_JSON,
                       raw=shorten(text.rstrip()) + f"  [{where}: {note}]")

    def _scan(self, max_bytes: int) -> tuple[int, str | None, bool]:
        """Finds the next ',' or ']' outside strings at nesting depth 0 (a closing bracket also closes the
        brackets opened after its match; one without a match is ignored). Returns (its distance from the
        read position; the text's head if it was over `max_bytes`, when all but its last part was dropped
        while scanning and the read position moved on; whether the ',' or ']' was found: if not, the
        distance is to the end of the file)."""
        open_, in_string, k, head = [], False, 0, None  # open brackets; k: characters scanned past self.pos
        while True:
            buf, i = self.buf, self.pos + k
            if in_string:
                i = _STRING_BODY.match(buf, i).end()
                if i < len(buf) and buf[i] == '"':
                    in_string, k = False, i + 1 - self.pos
                    continue
            elif m := _STRUCTURE.search(buf, i):
                char, i = m[0], m.start()
                if (char == "," or char == "]") and not open_:
                    return i - self.pos, head, True
                if char == '"':
                    in_string = True
                elif char == "{" or char == "[":
                    open_.append(char)
                elif char != "," and (opener := "{" if char == "}" else "[") in open_:
                    while open_.pop() != opener:  # (it also closes the brackets opened after its match)
                        pass
                k = i + 1 - self.pos
                continue
            else:
                i = len(buf)
            k = i - self.pos  # the end of the buffer, or a backslash whose escaped character is still to come
            if k > max_bytes:  # too large to keep: go on scanning without buffering it
                if head is None:
                    head = buf[self.pos:self.pos + RAW_TEXT_LIMIT]
                self.advance(k)
                k = 0
            if not self.fill():
                return len(self.buf) - self.pos, head, False

    def tail(self, reason: str, number: int, note: str) -> Element:
        while len(self.buf) - self.pos <= RAW_TEXT_LIMIT and self.fill():
            pass
        return Element(None, number, self.byte_pos, error=reason,
                       raw=shorten(self.buf[self.pos:]) + f"  [{note} at byte {self.byte_pos}]")


def _byte_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def shorten(text: str) -> str:
    """At most RAW_TEXT_LIMIT characters of `text`, writable as UTF-8 (`printable`)."""
    short = text if len(text) <= RAW_TEXT_LIMIT else text[:RAW_TEXT_LIMIT] + f"... [{len(text)} characters]"
    return printable(short)
