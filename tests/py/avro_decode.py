"""Decode Confluent-framed Avro values with the .avsc files alone (fastavro), independently of
the Rust code: proves the bytes possync writes agree with schemas/.

Usage: avro_decode.py SCHEMA.avsc < hex-lines  ->  one JSON object per line on stdout.
"""
import io
import json
import struct
import sys

import fastavro


def main() -> None:
    with open(sys.argv[1]) as f:
        schema = fastavro.parse_schema(json.load(f))
    for line in sys.stdin:
        raw = bytes.fromhex(line.strip())
        magic, schema_id = struct.unpack(">bI", raw[:5])
        if magic != 0:
            raise SystemExit(f"bad magic byte {magic}")
        buf = io.BytesIO(raw[5:])
        record = fastavro.schemaless_reader(buf, schema)
        if buf.read():
            raise SystemExit("trailing bytes after the record")
        record["_schema_id"] = schema_id
        print(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
