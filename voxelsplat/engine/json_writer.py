"""``metrics.json`` written so that a killed run never leaves it empty or glued together.

detectron2's :class:`~detectron2.utils.events.JSONWriter` opens the file when it is built (an
empty ``metrics.json`` exists before the first record) and writes records one ``write`` at a
time through a buffered handle, so a process killed mid-record leaves half a line, to which
a resumed run appends its first record. :class:`MetricsJSONWriter` writes the same records (the
scalars of each iteration not yet written, median-smoothed where the storage hints so, with
their ``iteration``) with :func:`voxelsplat.utils.io.append_json_lines`: each batch in one
append, the file created only once there is a record, a cut last line ended before the next
records. Read the file back with :func:`voxelsplat.utils.io.read_json_lines`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

from detectron2.utils.events import JSONWriter, get_event_storage

from voxelsplat.utils.io import append_json_lines, atomic_write_text, read_json_lines

__all__ = ["MetricsJSONWriter", "drop_records_from"]


def drop_records_from(json_file: str, iteration: int) -> int:
    """Remove the records of ``iteration`` and later from ``json_file`` (rewritten atomically;
    unreadable lines go too), so that a run resumed at ``iteration`` does not append a second
    copy of the iterations it runs again. Returns how many records were dropped (0 when the
    file does not exist)."""
    if not os.path.isfile(json_file):
        return 0
    records = read_json_lines(json_file)
    kept = [r for r in records if not (isinstance(r, dict) and int(r.get("iteration", -1)) >= iteration)]
    with open(json_file, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if len(kept) != lines:
        atomic_write_text(json_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return len(records) - len(kept)


class MetricsJSONWriter(JSONWriter):
    """A :class:`~detectron2.utils.events.JSONWriter` that appends each batch of records whole.

    Args:
        json_file: the JSON-lines file (records are appended to an existing one).
        window_size: median-smoothing window of the scalars whose ``smoothing_hint`` is True.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        # not JSONWriter.__init__: it opens (and so creates) the file at once
        self.json_file = json_file
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        to_save = defaultdict(dict)
        for name, (value, iteration) in storage.latest_with_smoothing_hint(self._window_size).items():
            if iteration <= self._last_write:  # written already
                continue
            to_save[iteration][name] = value
        if not to_save:
            return
        records = [dict(scalars, iteration=iteration) for iteration, scalars in to_save.items()]
        append_json_lines(self.json_file, records)
        self._last_write = max(to_save)

    def close(self) -> None:
        """Nothing to close: the file is only open during each append."""
