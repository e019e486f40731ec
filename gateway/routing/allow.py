"""The ``allow`` block of a rule (uplink and downlink): who may publish or subscribe."""

from __future__ import annotations

from collections.abc import Callable, Collection

import msgspec

from gateway.routing.rules import AllowSpec, Path
from gateway.routing.templates import TemplateError, split_fields
from gateway.routing.trie import Allow, Patterns

Problem = tuple[str, Path]


def compile_patterns(globs: list[str], names: Collection[str], unknown: Callable[[str], str],
                     where: Path, problems: list[Problem]) -> Patterns:
    """Allow globs; ``{name}`` is one of ``names`` (``unknown(name)`` says otherwise),
    ``{{`` ``}}`` are braces."""
    static: list[str] = []
    dynamic: list[list[str]] = []
    for i, text in enumerate(globs):
        try:
            pieces, _ = split_fields(text)
        except TemplateError as exc:
            problems.append((str(exc), (*where, i)))
            continue
        bad = [n for n in pieces[1::2] if n not in names]
        for name in bad:
            problems.append((unknown(name), (*where, i)))
        if bad:
            continue
        if len(pieces) == 1:
            static.append(pieces[0])
        else:
            dynamic.append(pieces)
    return Patterns(static, dynamic)


def compile_allow(allow: AllowSpec, names: Collection[str], unknown: Callable[[str], str],
                  problems: list[Problem]) -> Allow:
    """An ``allow`` block (uplink and downlink rules): ``names`` are the variables its
    patterns may use."""
    if allow.client_ids is not msgspec.UNSET:
        problems.append((
            "client_ids is not accepted: a client chooses its own client id, so it proves "
            "nothing; use usernames, identities or claims", ("allow", "client_ids")))
    elif not (allow.usernames or allow.identities or allow.claims):
        problems.append(("allow lists nobody; give usernames, identities or claims", ("allow",)))
    claims = []
    for claim, globs in allow.claims.items():
        where: Path = ("allow", "claims", claim)
        if not claim:
            problems.append(("empty claim name", where))
        elif not globs:
            problems.append((f"claim {claim!r} lists no value; nobody would match", where))
        else:
            claims.append((claim, compile_patterns(globs, names, unknown, where, problems)))
    usernames = compile_patterns(allow.usernames, names, unknown, ("allow", "usernames"),
                                 problems)
    identities = compile_patterns(allow.identities, names, unknown, ("allow", "identities"),
                                  problems)
    return Allow(usernames, identities, claims)
