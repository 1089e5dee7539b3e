"""Readers for every comparison format, one ranked-list record type, and the train/dev split.

Every format becomes `RankedExample`s: one prompt, K >= 2 responses and a rank for each (0 = best;
equal ranks are ties). A pairwise comparison is a ranked list with K = 2.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from models.formatting import FormattingError, Message, normalize_prompt, split_hh_pair

log = logging.getLogger(__name__)

FORMATS = ("hh", "pairwise", "ranked", "oasst")


class DataError(ValueError):
    """A bad record: the message carries file:line and what was wrong."""


@dataclass
class RankedExample:
    """One prompt with K ranked responses (InstructGPT's comparison unit)."""

    prompt: list[Message]
    responses: list[str]
    ranks: list[int]  # ranks[i] is response i's rank, 0 = best; equal ranks are ties
    margin: float = 0.0  # pairwise margin (pairwise format's optional `margin`)
    subset: str = ""
    source: str = ""  # file:line

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs: K(K-1)/2 when there are no ties."""
        out = []
        for i, j in combinations(range(len(self.responses)), 2):
            if self.ranks[i] < self.ranks[j]:
                out.append((i, j))
            elif self.ranks[j] < self.ranks[i]:
                out.append((j, i))
        return out

    def prompt_key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


@dataclass
class ReadStats:
    lines: int = 0
    examples: int = 0
    pairs: int = 0
    skipped_bad: int = 0
    dropped_identical: int = 0
    bad: list[str] = field(default_factory=list)


def _open_text(path: Path) -> Any:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def detect_format(record: dict[str, Any]) -> str:
    if "message_tree_id" in record or (isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]):
        return "oasst"
    if "responses" in record:
        return "ranked"
    if "chosen" in record and "rejected" in record:
        return "pairwise" if "prompt" in record else "hh"
    raise DataError(
        "cannot tell the format from keys "
        + ", ".join(sorted(record))
        + f"; name it with --format ({', '.join(FORMATS)})"
    )


def _require_str(rec: dict[str, Any], key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise DataError(f"'{key}' must be a string, got {type(v).__name__ if key in rec else 'nothing'}")
    return v


def _prompt(rec: dict[str, Any]) -> list[Message]:
    if "prompt" not in rec:
        raise DataError("'prompt' is missing")
    try:
        return normalize_prompt(rec["prompt"])
    except FormattingError as e:
        raise DataError(str(e)) from e


def parse_hh(rec: dict[str, Any], subset: str) -> list[RankedExample]:
    chosen, rejected = _require_str(rec, "chosen"), _require_str(rec, "rejected")
    try:
        prompt, c, r = split_hh_pair(chosen, rejected)
    except FormattingError as e:
        raise DataError(str(e)) from e
    return [RankedExample(prompt, [c, r], [0, 1], subset=str(rec.get("subset", subset)))]


def parse_pairwise(rec: dict[str, Any], subset: str) -> list[RankedExample]:
    prompt = _prompt(rec)
    c, r = _require_str(rec, "chosen"), _require_str(rec, "rejected")
    margin = rec.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or margin != margin:
        raise DataError(f"'margin' must be a number, got {margin!r}")
    sub = rec.get("subset", subset)
    if not isinstance(sub, str):
        raise DataError("'subset' must be a string")
    return [RankedExample(prompt, [c, r], [0, 1], margin=float(margin), subset=sub)]


def parse_ranked(rec: dict[str, Any], subset: str) -> list[RankedExample]:
    prompt = _prompt(rec)
    responses = rec.get("responses")
    if not isinstance(responses, list) or not all(isinstance(x, str) for x in responses):
        raise DataError("'responses' must be a list of strings")
    k = len(responses)
    if k < 2:
        raise DataError(f"'responses' has {k} item(s); a ranked list needs at least 2")
    if "ranks" in rec:
        ranks = rec["ranks"]
        if (
            not isinstance(ranks, list)
            or len(ranks) != k
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ranks)
        ):
            raise DataError(f"'ranks' must be {k} non-negative integers, one per response (0 = best)")
    elif "ranking" in rec:
        ranking = rec["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise DataError(f"'ranking' must list every response index 0..{k - 1} once, best first")
        ranks = [0] * k
        for pos, idx in enumerate(ranking):
            ranks[idx] = pos
    else:
        raise DataError("a ranked record needs 'ranking' (indices best first) or 'ranks' (rank per response)")
    sub = rec.get("subset", subset)
    return [RankedExample(prompt, list(responses), list(ranks), subset=str(sub))]


def parse_oasst(rec: dict[str, Any], subset: str) -> list[RankedExample]:
    root = rec.get("prompt")
    if not isinstance(root, dict) or "text" not in root:
        raise DataError("an OpenAssistant tree needs a 'prompt' message object with 'text' and 'replies'")
    out: list[RankedExample] = []

    def walk(node: dict[str, Any], path: list[Message]) -> None:
        role = "user" if node.get("role") == "prompter" else "assistant"
        here = [*path, {"role": role, "content": str(node.get("text", ""))}]
        replies = [r for r in node.get("replies", []) or [] if isinstance(r, dict) and not r.get("deleted")]
        ranked = [r for r in replies if isinstance(r.get("rank"), int)]
        if role == "user" and len(ranked) >= 2:
            out.append(
                RankedExample(
                    here,
                    [str(r.get("text", "")) for r in ranked],
                    [int(r["rank"]) for r in ranked],
                    subset=subset,
                )
            )
        for r in replies:
            walk(r, here)

    walk(root, [])
    return out


PARSERS = {"hh": parse_hh, "pairwise": parse_pairwise, "ranked": parse_ranked, "oasst": parse_oasst}


def _subset_from_path(path: Path, fmt: str) -> str:
    if fmt == "oasst":
        return "oasst"
    name = path.name
    for suf in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suf)
    return name


def read_file(
    path: str | Path, fmt: str | None = None, *, skip_bad: bool = False, drop_identical: bool = True
) -> tuple[list[RankedExample], ReadStats]:
    """Read one JSONL(.gz) file. A bad line raises DataError with file:line unless `skip_bad`."""
    p = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    stats = ReadStats()
    examples: list[RankedExample] = []
    with _open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.lines += 1
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise DataError("a line must hold one JSON object")
                fmt = fmt or detect_format(rec)
                parsed = PARSERS[fmt](rec, _subset_from_path(p, fmt))
            except (json.JSONDecodeError, DataError) as e:
                msg = f"{where}: {e}"
                if not skip_bad:
                    raise DataError(msg) from None
                stats.skipped_bad += 1
                stats.bad.append(msg)
                continue
            for ex in parsed:
                ex.source = where
                kept = _drop_identical(ex, stats) if drop_identical else ex
                if kept is None:
                    continue
                examples.append(kept)
                stats.pairs += len(kept.pairs())
    stats.examples = len(examples)
    if stats.skipped_bad:
        log.warning("%s: skipped %d bad line(s), first: %s", p, stats.skipped_bad, stats.bad[0])
    return examples, stats


def _drop_identical(ex: RankedExample, stats: ReadStats) -> RankedExample | None:
    """Drop responses that repeat an earlier one (no signal); None when fewer than 2 ranks remain.

    `stats.dropped_identical` counts whole comparisons dropped plus repeated responses removed.
    """
    seen: set[str] = set()
    keep: list[int] = []
    for i, r in enumerate(ex.responses):
        if r.strip() not in seen:  # whitespace around an answer is not content (models/formatting.py)
            seen.add(r.strip())
            keep.append(i)
    if len({ex.ranks[i] for i in keep}) < 2:
        stats.dropped_identical += 1
        return None
    if len(keep) == len(ex.responses):
        return ex
    stats.dropped_identical += len(ex.responses) - len(keep)
    return RankedExample(
        ex.prompt,
        [ex.responses[i] for i in keep],
        [ex.ranks[i] for i in keep],
        ex.margin,
        ex.subset,
        ex.source,
    )


def read_files(
    paths: Sequence[str | Path],
    fmt: str | None = None,
    *,
    skip_bad: bool = False,
    drop_identical: bool = True,
) -> tuple[list[RankedExample], dict[str, ReadStats]]:
    all_ex: list[RankedExample] = []
    stats: dict[str, ReadStats] = {}
    for p in paths:
        ex, st = read_file(p, fmt, skip_bad=skip_bad, drop_identical=drop_identical)
        all_ex.extend(ex)
        stats[str(p)] = st
    return all_ex, stats


def to_record(ex: RankedExample, fmt: str) -> dict[str, Any]:
    """The inverse of the readers for the formats rmserve writes (pairwise, ranked)."""
    if fmt == "pairwise":
        if len(ex.responses) != 2:
            raise DataError("pairwise records hold exactly two responses")
        c, r = (0, 1) if ex.ranks[0] < ex.ranks[1] else (1, 0)
        rec: dict[str, Any] = {"prompt": ex.prompt, "chosen": ex.responses[c], "rejected": ex.responses[r]}
        if ex.margin:
            rec["margin"] = ex.margin
        if ex.subset:
            rec["subset"] = ex.subset
        return rec
    if fmt == "ranked":
        return {"prompt": ex.prompt, "responses": ex.responses, "ranks": ex.ranks, "subset": ex.subset}
    raise DataError(f"writing format {fmt!r} is not supported; write 'pairwise' or 'ranked'")


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def split_dev(
    examples: Sequence[RankedExample], fraction: float, seed: int = 0
) -> tuple[list[RankedExample], list[RankedExample]]:
    """Deterministic train/dev split by a hash of the prompt (one prompt never lands on both sides)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dev fraction must be in [0, 1), got {fraction}")
    train: list[RankedExample] = []
    dev: list[RankedExample] = []
    for ex in examples:
        h = hashlib.sha256(f"{seed}\x00{ex.prompt_key()}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        (dev if u < fraction else train).append(ex)
    return train, dev


def iter_pairs(examples: Sequence[RankedExample]) -> Iterator[tuple[RankedExample, int, int]]:
    for ex in examples:
        for w, lo in ex.pairs():
            yield ex, w, lo
