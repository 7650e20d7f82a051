"""One error policy: a problem the user can fix is an :class:`LdmError`; everything else is a bug.

Every ``ldm`` command prints an ``LdmError`` as one line on stderr (naming the flag or file and what to do)
and exits with status 2, without a traceback (``--debug`` or ``LDM_DEBUG=1`` shows it). Any other exception
is an internal error and keeps its traceback. Library code raises the subclass that fits; the messages are
written for the person at the command line.
"""

from __future__ import annotations


class LdmError(Exception):
    """A user-fixable problem: a bad flag or argument, a missing, corrupt or unsuitable file."""


class UsageError(LdmError, ValueError):
    """A flag or argument value that cannot work (checked before any work starts)."""
