"""Exit codes (borg's scheme): 0 success, 1 warning, 2 error (bad input or anything not
below), 3 not found, 4 conflict with the current state, 5 a service is unavailable,
6 out of space, 7 fenced.
"""

from __future__ import annotations

from typing import Any

from cargohold.errors import Kind

EXIT_OK = 0

#: The command did what was asked, but what it found needs a person: a scrub found chunks
#: without a clean copy or could not reach every copy; a salvage left newer chunks or
#: unreachable copies behind.
EXIT_WARNING = 1
EXIT_CODES = {
    Kind.INVALID: 2,
    Kind.INTERNAL: 2,
    Kind.NOT_FOUND: 3,
    Kind.CONFLICT: 4,
    Kind.UNAVAILABLE: 5,
    Kind.NO_SPACE: 6,
    Kind.FENCED: 7,
}



def scrub_status(report: dict[str, Any]) -> int:
    """A scrub that lost chunks or could not read every copy ends with a warning."""
    return EXIT_WARNING if report["lost"] or report["skipped"] else EXIT_OK


def salvage_status(done: dict[str, Any]) -> int:
    """A salvage that left newer chunks or unreachable copies behind ends with a warning."""
    return EXIT_WARNING if done["chunks_newer_elsewhere"] or done["unreachable"] else EXIT_OK
