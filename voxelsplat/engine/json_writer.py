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

from collections import defaultdict

from detectron2.utils.events import JSONWriter, get_event_storage

from voxelsplat.utils.io import append_json_lines

__all__ = ["MetricsJSONWriter"]


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
