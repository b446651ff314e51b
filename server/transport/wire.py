"""Which field of an undecodable request body is at fault, read off the wire format.

protobuf refuses a body with a string field that is not UTF-8 and says nothing of the
field. Walking the body's fields by their numbers finds it, so that the answer's
BadRequest can name it (as "student.name", "requests[3].request_id").
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_DEPTH = 8  # nested messages looked into; the API's requests nest three deep


def bad_utf8_field(descriptor: Descriptor, data: bytes, depth: int = 0) -> str | None:
    """The path of the first string field in data (a message of descriptor) that is
    not valid UTF-8, or None when there is none or the body cannot be walked."""
    seen: dict[int, int] = {}  # field number: occurrences so far (a repeated field's index)
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                _, pos = _varint(data, pos)
            elif wire == _FIXED64:
                pos += 8
            elif wire == _FIXED32:
                pos += 4
            elif wire == _LENGTH:
                size, pos = _varint(data, pos)
                value, pos = data[pos : pos + size], pos + size
                if pos > end:
                    return None
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen.get(number, 0)
                seen[number] = index + 1
                name = field.name
                if field.is_repeated:
                    name = f"{name}[{index}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif field.message_type is not None and depth < _DEPTH:
                    inner = bad_utf8_field(field.message_type, value, depth + 1)
                    if inner is not None:
                        return f"{name}.{inner}"
            else:
                return None  # groups, or not protobuf at all
    except IndexError:
        return None  # cut short
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 63:
            return value, pos
        shift += 7
