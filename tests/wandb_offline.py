"""Read what an offline W&B run logged, from its ``run-*.wandb`` file.

The file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type)
where type 1 is a whole record and 2/3/4 are the first/middle/last fragments
of one. Each record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, "bad crc"
        pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


class OfflineRun:
    """The config, history, summary, metric definitions, artifacts and exit code one offline
    run file holds."""

    def __init__(self, path: Path):
        self.path, self.config, self.history, self.summary = path, {}, [], {}
        self.exit_code, self.run_id, self.group, self.name, self.job_type = None, None, None, None, None
        self.tags, self.notes = [], None
        self.metrics = {}  # name or glob -> {"step_metric": ..., "summary": [...]}, as define_metric sent them
        self.artifacts = []  # {"type", "name", "metadata", "files"} of each artifact the run logged
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                self.run_id, self.group, self.name = run.run_id, run.run_group, run.display_name
                self.job_type, self.tags, self.notes = run.job_type, list(run.tags), run.notes
                self._update_config(run.config.update)
            elif kind == "config":
                self._update_config(record.config.update)
            elif kind == "history":
                self.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "metric":
                metric = record.metric
                self.metrics[metric.name or metric.glob_name] = {
                    "step_metric": metric.step_metric,
                    "summary": [field.name for field, on in metric.summary.ListFields() if on]}
            elif kind == "artifact":
                artifact = record.artifact
                self.artifacts.append({"type": artifact.type, "name": artifact.name,
                                       "metadata": json.loads(artifact.metadata or "{}"),
                                       "files": sorted(entry.path for entry in artifact.manifest.contents)})
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def _update_config(self, items) -> None:
        for item in items:
            value = json.loads(item.value_json)
            self.config[item.key] = value.get("value", value) if isinstance(value, dict) else value

    def metric(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]


def offline_runs(directory: Path) -> list[OfflineRun]:
    return [OfflineRun(p) for p in sorted(Path(directory).rglob("run-*.wandb"))]
