"""The one exception type of la-seg: bad input that the user can fix.

`la-seg` turns it into one `la-seg: error: ...` line and exit status 2, so every message names the file or
option and what is wrong with it.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or settings: the message names the file or field and what is wrong with it."""
