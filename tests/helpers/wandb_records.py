"""Read the history of an offline Weights & Biases run (its run-*.wandb file) without a server.

The file is wandb's record log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of
LevelDB-log records (crc32, length, type: full/first/middle/last), each a protobuf ``Record``."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict, Iterator, List

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: str) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _ = HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb run file"
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_runs(save_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb")))


def read_run(path: str) -> Dict:
    """{"project", "name", "config": {...}, "history": {step: {key: value}}}"""
    out: Dict = {"history": {}, "config": {}}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["project"], out["name"] = r.run.project, r.run.display_name
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out["history"].setdefault(int(row["_step"]), {}).update(row)
    return out
