"""Dividing a merge among its participants: who merges which tensors. Spec: proto/merge.md.

Owns the share planner of a merge job: tensors are divided by bytes (largest first, each
to the participant with the fewest bytes so far: Graham's LPT rule, within 4/3 of the
best split), and the share of a participant that died or fell behind is divided among
the others the same way, keeping what is already done. Deterministic: every daemon that
plans from the same inputs gets the same plan, so the plan need not be sent. Pure: must
not import trio, libp2p or sockets, and reads no clock (callers say who is slow).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def plan_shares(tensors: Mapping[str, int], participants: Sequence[str]) -> dict[str, list[str]]:
    """participant -> tensor names (sorted), from tensor name -> bytes. Ties go to the
    participant earlier in ``participants``; tensors of equal size are placed in name
    order."""
    if not participants:
        raise ValueError("a merge needs at least one participant")
    if len(set(participants)) != len(participants):
        raise ValueError("participants must be distinct")
    load = {p: 0 for p in participants}
    shares: dict[str, list[str]] = {p: [] for p in participants}
    rank = {p: i for i, p in enumerate(participants)}
    for name, size in sorted(tensors.items(), key=lambda kv: (-kv[1], kv[0])):
        if size < 0:
            raise ValueError(f"tensor {name!r} has a negative size")
        who = min(participants, key=lambda p: (load[p], rank[p]))
        shares[who].append(name)
        load[who] += size
    return {p: sorted(names) for p, names in shares.items()}


def reassign(shares: Mapping[str, Sequence[str]], tensors: Mapping[str, int], gone: Iterable[str],
             done: Iterable[str] = ()) -> dict[str, list[str]]:
    """A new plan after the participants ``gone`` died or fell behind: their tensors not
    in ``done`` go to the others, largest first to the least loaded (counting only
    tensors still to do). The others keep their own shares. Raises ValueError when no
    participant is left."""
    gone_set = set(gone)
    finished = set(done)
    remaining = [p for p in shares if p not in gone_set]
    if not remaining:
        raise ValueError("every participant is gone")
    out = {p: sorted(shares[p]) for p in remaining}
    load = {p: sum(tensors[n] for n in out[p] if n not in finished) for p in remaining}
    rank = {p: i for i, p in enumerate(remaining)}
    orphans = sorted((n for p in gone_set & set(shares) for n in shares[p] if n not in finished),
                     key=lambda n: (-tensors[n], n))
    for name in orphans:
        who = min(remaining, key=lambda p: (load[p], rank[p]))
        out[who].append(name)
        load[who] += tensors[name]
    return {p: sorted(names) for p, names in out.items()}


def share_bytes(shares: Mapping[str, Sequence[str]], tensors: Mapping[str, int]) -> dict[str, int]:
    return {p: sum(tensors[n] for n in names) for p, names in shares.items()}
