"""Safe identifiers: the one rule for names that come from outside and end up in paths.

Case ids, site names, fold names and submission names are read from datasets (``cases.csv``,
``splits.json``), importers' source folders and site tables, manifests and uploads, and the benchmark
builds file and folder names from them (``imagesTr/<case>_0000.nii.gz``, ``results/<run>/<fold>/``,
``submissions/<name>/``). Each one is checked with :func:`check_identifier` where it enters, before
any path is made from it, so a name such as ``../x``, ``/etc``, ``a\\x00b`` or a look-alike in other
scripts (fullwidth solidus ``／``, Cyrillic ``а``, a right-to-left override) never reaches the disk.

**The rule** (:data:`IDENTIFIER_PATTERN`): 1 to 64 ASCII characters, letters, digits, ``.``, ``_``
and ``-``, starting with a letter or digit, and no ``..`` anywhere. It admits every id the shipped
importers and generator produce (``MGHNICU_001``, ``case_0007``, ``SiteA``) and nothing that a shell,
a file system or a URL treats specially. Submission names use the same rule in lower case
(:data:`SUBMISSION_NAME_PATTERN`, the pattern of ``submission.yaml``'s ``name``).

File names inside archives are checked by :func:`check_file_name` with the wider
:data:`FILE_NAME_PATTERN` (``__init__.py`` and ``.gitkeep`` are normal files; up to 255 characters,
the usual file-system limit).

Only the standard library is imported, so any module can use this one.
"""

from __future__ import annotations

import re

#: The identifier rule (see the module docstring); ``..`` is refused separately (no look-ahead, so the
#: same text works in pydantic's Rust regex engine).
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: ``submission.yaml``'s ``name``: the identifier rule in lower case (names are folder names everywhere).
SUBMISSION_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: One path component of a file inside a submission or upload archive.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_.][A-Za-z0-9._+-]{0,254}$"
#: Longest identifier and file name, in characters.
MAX_IDENTIFIER_LENGTH = 64
MAX_FILE_NAME_LENGTH = 255

_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_FILE_NAME = re.compile(FILE_NAME_PATTERN)


class IdentifierError(ValueError):
    """A name from a dataset, manifest, upload or importer is not a safe identifier.

    ``value`` is the offending text, ``what`` what it names (``case id``, ``site``...), ``source`` where
    it came from (a file, an upload, a form field).
    """

    def __init__(self, value: object, what: str, source: str, reason: str, fix: str):
        self.value, self.what, self.source, self.reason = value, what, str(source), reason
        super().__init__(f"{source}: {what} {_shown(value)} {reason} ({fix})")


def _shown(value: object) -> str:
    """The value as one safe line: ``ascii()`` escapes NUL, controls, RTL overrides and look-alikes."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def identifier_problem(value: object) -> str | None:
    """Why ``value`` is not a safe identifier (one phrase), or ``None`` when it is one."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if not value:
        return "is empty"
    if not value.isascii():
        return "has non-ASCII characters (look-alikes of '/', '.' or letters are refused)"
    if len(value) > MAX_IDENTIFIER_LENGTH:
        return f"is {len(value)} characters long, over the limit of {MAX_IDENTIFIER_LENGTH}"
    if ".." in value:
        return "contains '..'"
    if not _IDENTIFIER.match(value):
        if "/" in value or "\\" in value:
            return "contains a path separator"
        if "\x00" in value:
            return "contains a NUL byte"
        return "has characters other than letters, digits, '.', '_' and '-', or does not start with a letter or digit"
    return None


def check_identifier(value: object, what: str, source: str | object) -> str:
    """Return ``value`` when it is a safe identifier, else raise :class:`IdentifierError`.

    Args:
        value: the name to check (case id, site, fold or submission name).
        what: what it names, for the message (``"case id"``).
        source: where it came from, for the message (a file path, ``"upload form"``).
    """
    reason = identifier_problem(value)
    if reason is not None:
        raise IdentifierError(value, what, str(source), reason,
                              "use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value  # type: ignore[return-value]


def file_name_problem(value: str) -> str | None:
    """Why one path component is not a safe file name, or ``None``."""
    if not value:
        return "is empty"
    if not value.isascii():
        return "has non-ASCII characters (look-alikes of '/', '.' or letters are refused)"
    if len(value) > MAX_FILE_NAME_LENGTH:
        return f"is {len(value)} characters long, over the limit of {MAX_FILE_NAME_LENGTH}"
    if value in (".", "..") or not _FILE_NAME.match(value):
        return "is not a plain file name (letters, digits, '.', '_', '+', '-'; no spaces, controls or '..')"
    return None


def check_file_name(value: str, what: str, source: str | object) -> str:
    """Return ``value`` when it is a safe single path component, else raise :class:`IdentifierError`."""
    reason = file_name_problem(value)
    if reason is not None:
        raise IdentifierError(value, what, str(source), reason, "rename it with letters, digits, '.', '_', '+' or '-' only")
    return value


def check_submission_name(value: object, source: str | object) -> str:
    """:func:`check_identifier` for a submission name, which must also be lower case (:data:`SUBMISSION_NAME_PATTERN`)."""
    name = check_identifier(value, "submission name", source)
    if name != name.lower():
        raise IdentifierError(value, "submission name", str(source), "has upper-case letters",
                              "use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name
