"""The one exception type for expected user-input errors (bad data files, records, fields).

Raised by every layer that reads what a user provides (dataset files, benchmark files, images given by
path); its message is ONE line naming the file, the record and the field, so ``run.py`` prints it as is
(exit code 2, no traceback). A ``ValueError`` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Expected bad user input; ``str(error)`` is one line naming file / record / field."""
