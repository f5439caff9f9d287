"""`site prepare`'s lineage: which input records each cleaned record was made from, for the privacy ledger.

The ledger keys a record by its exact content (`common.data.record_digests`; chats and prompt/response
rows by `common.causal_lm.lm_record_digests`), so a row that prepare normalises or redacts is, to the
ledger, a new record, and a row kept in place of its duplicates stands for rows that are gone. Prepare
therefore links each cleaned record to the input records it came from (`PrivacyLedger.link`), and the
ledger charges them as one lineage: the cleaned file starts with the spend of the rows it came from.

Both sides are keyed exactly as the training path keys them: the input rows as read (before
normalisation and redaction), the cleaned rows as the cleaned file holds them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .prepare_rows import Columns, Pair, Row, raw_fields


def row_digests(rows: Sequence[Row], columns: Columns, *, cleaned: bool) -> list[str]:
    """The ledger's key of each row: of its text fields as read (``cleaned`` False) or as prepare left them."""
    texts = [r.fields if cleaned else raw_fields(r, columns) for r in rows]
    if columns.task == "classification":
        from fedtune.common.data import record_digests

        return record_digests([t[0] for t in texts], [str(r.label) for r in rows])
    # The training path's own key function, on the same turns it would parse from the file.
    from fedtune.common.causal_lm import ChatMessage, LMTable, lm_record_digests

    conversations = [tuple(ChatMessage(role, text) for role, text in zip(r.roles or ("user", "assistant"), t))
                     for r, t in zip(rows, texts)]
    return lm_record_digests(LMTable(conversations=conversations, source="", from_messages=bool(columns.messages)))


def sources_of(rows: Sequence[Row], kept: Sequence[Row], duplicates: Sequence[Pair], columns: Columns) -> dict[str, frozenset[str]]:
    """{cleaned record: the input records it came from}, only for cleaned records that are not simply their own input.

    A kept row comes from itself as read and from every row dropped as its exact or near duplicate
    (through a chain: a row can be the exact duplicate of a row that was then dropped as a near
    duplicate of a third). Rows dropped for any other reason (empty, unusable, label conflicts) are
    in no cleaned record and link to nothing.
    """
    raw = dict(zip((r.number for r in rows), row_digests(rows, columns, cleaned=False)))
    clean = dict(zip((r.number for r in kept), row_digests(kept, columns, cleaned=True)))
    into = {p.row: p.kept for p in duplicates}
    members: dict[int, set[str]] = {n: {raw[n]} for n in clean}
    for row in rows:
        target, seen = row.number, set()
        while target not in clean and target in into and target not in seen:
            seen.add(target)
            target = into[target]
        if target in clean:
            members[target].add(raw[row.number])
    out: dict[str, frozenset[str]] = {}
    for n, digest in clean.items():
        if members[n] != {digest}:
            out[digest] = out.get(digest, frozenset()).union(members[n])
    return out
