"""Batching under a token budget: padded cost (longest x count, length-sorted) for the padded forward,
real tokens (`packed_batches`) for the packed canonical forward. Pure Python, shared by the trainer's
evaluation and the service's batcher (which must not import torch)."""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(
    lengths: Sequence[int], batch_tokens: int, max_seqs: int = 256, max_pad_ratio: float | None = None
) -> list[list[int]]:
    """Indices grouped into batches whose padded cost (longest x count) stays under `batch_tokens`
    and, with `max_pad_ratio`, within that ratio of their real tokens (so that short sequences do not
    pad to a long one: on a CPU every padded token costs as much as a real one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if cur and (
            n * (len(cur) + 1) > batch_tokens
            or len(cur) >= max_seqs
            or (max_pad_ratio is not None and n * (len(cur) + 1) > max_pad_ratio * (real + n))
        ):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_shared_prefixes(
    seqs: Sequence[Sequence[int]], min_prefix: int = 16, min_saved: int | None = None, pass_cost: int = 16
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split sequence indices into shared-prefix groups and the rest, doing the least work.

    Returns (groups, singles): each group is (prefix length, member indices) with at least two
    members, a prefix of at least `min_prefix` tokens that leaves every member one token or more of
    its own, and at least `min_saved` tokens of work saved (default: twice `min_prefix`, the rule the
    batcher plans with and the runtime groups by); `singles` are the other indices.

    Sequences sorted by their ids put those with long common prefixes next to each other; the
    partition of that order into runs is chosen by dynamic programming on token cost (a group costs
    its prefix once, each member's own tokens, and `pass_cost` for the extra pass). So when some of a
    prompt's answers were truncated differently (older turns dropped), the rest still share the whole
    prompt instead of all sharing only the system header.
    """
    if min_saved is None:
        min_saved = 2 * min_prefix
    n = len(seqs)
    order = sorted(range(n), key=lambda i: tuple(seqs[i]))
    lens = [len(seqs[i]) for i in order]
    adj = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of order[:j]
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last run, its prefix length; 0 = single)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1] + lens[j - 1], (j - 1, 0)
        lcp, total = lens[j - 1] - 1, lens[j - 1]
        for i in range(j - 2, -1, -1):  # the run order[i:j]
            lcp = min(lcp, adj[i], lens[i] - 1)
            if lcp < min_prefix:
                break  # only shrinks as the run grows
            total += lens[i]
            m = j - i
            if lcp * (m - 1) < min_saved:
                continue
            cost = best[i] + total - (m - 1) * lcp + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, (i, lcp)
    groups: list[tuple[int, list[int]]] = []
    singles: list[int] = []
    j = n
    while j > 0:
        i, plen = cut[j]
        if plen:
            groups.append((plen, [order[k] for k in range(i, j)]))
        else:
            singles.append(order[i])
        j = i
    groups.reverse()
    singles.reverse()
    return groups, singles


def shared_prefix_batches(
    seqs: Sequence[Sequence[int]],
    batch_tokens: int,
    max_seqs: int = 256,
    min_prefix: int = 16,
    min_saved: int | None = None,
    max_pad_ratio: float | None = None,
) -> list[list[int]]:
    """Batches that keep each shared-prefix group together (for a runtime that computes a shared
    prefix once): a group counts its prefix once plus its members' own tokens against `batch_tokens`;
    a group larger than one batch is cut into pieces of whole members. The other sequences are
    length-batched as usual."""
    groups, singles = group_shared_prefixes(seqs, min_prefix, min_saved)
    batches: list[list[int]] = []
    cur: list[int] = []
    cost = 0
    for plen, members in sorted(groups, key=lambda g: -len(g[1])):
        total = plen + sum(len(seqs[i]) - plen for i in members)
        if cur and (cost + total > batch_tokens or len(cur) + len(members) > max_seqs):
            batches.append(cur)  # start the group in a fresh batch rather than cut it
            cur, cost = [], 0
        first = True
        for i in members:
            extra = len(seqs[i]) - plen + (plen if first else 0)
            if cur and (cost + extra > batch_tokens or len(cur) >= max_seqs):
                batches.append(cur)  # a group larger than one batch: cut it, its prefix runs again
                cur, cost = [], 0
                extra = len(seqs[i])
            cur.append(i)
            cost += extra
            first = False
    if cur:
        batches.append(cur)
    batches.extend(
        [singles[i] for i in b]
        for b in length_batches([len(seqs[i]) for i in singles], batch_tokens, max_seqs, max_pad_ratio)
    )
    return batches


class PromptSplit(list[int]):
    """Token ids that also carry their prompt/answer boundary: the first `prompt_len` ids are the prompt
    (`models.formatting.Encoded.prompt_len`).

    A plain list everywhere else (the batcher counts and sorts it as one); the canonical forward
    (models/canonical.py) computes the prompt as its own segment, once per pass for all its answers.
    A `prompt_len` outside 1..len-1 means no split.
    """

    prompt_len: int

    def __init__(self, ids: Sequence[int], prompt_len: int) -> None:
        super().__init__(ids)
        self.prompt_len = int(prompt_len)


def prompt_len_of(seq: Sequence[int]) -> int:
    """The prompt boundary `seq` carries, 0 when none (or none usable: the answer must keep a token)."""
    p = int(getattr(seq, "prompt_len", 0))
    return p if 0 < p < len(seq) else 0


def packed_cost(seqs: Sequence[Sequence[int]]) -> int:
    """Real tokens a packed pass of `seqs` computes: each distinct prompt once, each answer's own tokens."""
    prompts: set[tuple[int, ...]] = set()
    total = 0
    for s in seqs:
        p = prompt_len_of(s)
        if p:
            prompts.add(tuple(s[:p]))
        total += len(s) - p
    return total + sum(len(p) for p in prompts)


def packed_batches(seqs: Sequence[Sequence[int]], batch_tokens: int, max_seqs: int = 256) -> list[list[int]]:
    """Batches for a packed forward, whose cost is real tokens (`packed_cost`: no padding, each distinct
    prompt once) under `batch_tokens` and at most `max_seqs` sequences. Answers to one prompt are kept
    together (their prompt is computed once per pass), largest groups first; a group larger than a batch
    is cut into whole members (its prompt then runs once in each piece)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        p = prompt_len_of(s)
        groups.setdefault(tuple(s[:p]) if p else (), []).append(i)
    loose = groups.pop((), [])
    ordered = [m for _, m in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    ordered += [[i] for i in sorted(loose, key=lambda i: len(seqs[i]))]
    batches: list[list[int]] = []
    cur: list[int] = []
    cost = 0
    prompts: set[tuple[int, ...]] = set()
    for members in ordered:
        for i in members:
            s = seqs[i]
            p = prompt_len_of(s)
            key = tuple(s[:p])
            extra = len(s) - (p if p and key in prompts else 0)
            if cur and (cost + extra > batch_tokens or len(cur) >= max_seqs):
                batches.append(cur)
                cur, cost, prompts = [], 0, set()
                extra = len(s)
            cur.append(i)
            cost += extra
            if p:
                prompts.add(key)
    if cur:
        batches.append(cur)
    return batches
