"""The bench's sections, run so that one failing loses none of the others.

A failed section is recorded in the results (its error and traceback) and
reported; the run goes on with the next section and ends non-zero."""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable


class Sections:
    def __init__(self, results: dict[str, Any], progress: Callable[[str], None] = print) -> None:
        self.results = results
        self.progress = progress
        self.failed: dict[str, str] = {}
        self.elapsed: dict[str, float] = {}

    def run(self, name: str, body: Callable[[], Any], needs: tuple[str, ...] = ()) -> bool:
        """Run one section; an exception in it fails this section only. A section whose
        prerequisite failed is not run and counts as failed. True if it succeeded."""
        missing = [n for n in needs if n in self.failed]
        started = time.monotonic()
        try:
            if missing:
                raise RuntimeError(f"not run: needs {', '.join(missing)}, which failed")
            body()
            return True
        except Exception as e:  # noqa: BLE001 -- the point: any failure stays in its section
            error = f"{type(e).__name__}: {e}"
            self.failed[name] = error
            self.results.setdefault("failed_sections", {})[name] = {
                "error": error, "traceback": "" if missing else traceback.format_exc()}
            self.progress(f"  section {name!r} FAILED: {error}")
            return False
        finally:
            self.elapsed[name] = round(time.monotonic() - started, 1)

    def skip(self, name: str, reason: str) -> None:
        """A section with nothing to run on (said in the results; not a failure)."""
        self.results.setdefault("skipped_sections", {})[name] = reason
        self.progress(f"  section {name!r} skipped: {reason}")
