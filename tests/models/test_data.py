from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from models.data import DataError, RankedExample, read_file, split_dev, to_record, write_jsonl

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairwise_round_trip(tmp_path: Path) -> None:
    recs = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5, "subset": "greet"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "chosen": "4",
            "rejected": "5",
            "subset": "math",
        },
    ]
    src = tmp_path / "p.jsonl"
    write_jsonl(src, recs)
    ex, st = read_file(src)
    assert st.examples == 2 and st.pairs == 2
    assert ex[0].margin == 1.5 and ex[0].subset == "greet" and ex[0].pairs() == [(0, 1)]
    back = [to_record(e, "pairwise") for e in ex]
    assert back[0] == {**recs[0], "prompt": [{"role": "user", "content": "Hi"}]}
    assert back[1] == recs[1]
    write_jsonl(tmp_path / "again.jsonl", back)
    assert [e.responses for e in read_file(tmp_path / "again.jsonl")[0]] == [e.responses for e in ex]


def test_ranked_with_ranking_and_ties_round_trip(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "r.jsonl",
        [
            json.dumps({"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}),
            json.dumps({"prompt": "Q2", "responses": ["w", "x", "y", "z"], "ranks": [0, 1, 1, 2]}),
        ],
    )
    ex, st = read_file(src)
    assert ex[0].ranks == [1, 3, 0, 2]
    assert len(ex[0].pairs()) == 6  # K(K-1)/2 with no ties
    assert len(ex[1].pairs()) == 5  # one tied pair left out
    assert st.pairs == 11
    write_jsonl(tmp_path / "b.jsonl", [to_record(e, "ranked") for e in ex])
    again, _ = read_file(tmp_path / "b.jsonl")
    assert [(e.responses, e.ranks) for e in again] == [(e.responses, e.ranks) for e in ex]


def test_hh_reader_splits_prompt_and_drops_identical(tmp_path: Path) -> None:
    same = "\n\nHuman: Hi\n\nAssistant: Same."
    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write(
            json.dumps(
                {
                    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                    "rejected": "\n\nHuman: Hi\n\nAssistant: No.",
                }
            )
            + "\n"
        )
        f.write(json.dumps({"chosen": same, "rejected": same}) + "\n")
    ex, st = read_file(src)
    assert st.lines == 2 and st.examples == 1 and st.dropped_identical == 1
    assert ex[0].prompt == [{"role": "user", "content": "Hi"}] and ex[0].responses == ["Hello!", "No."]
    assert ex[0].subset == "hh"
    kept, _ = read_file(src, drop_identical=False)
    assert len(kept) == 2


def test_oasst_tree_yields_ranked_lists(tmp_path: Path) -> None:
    tree = {
        "message_tree_id": "t",
        "prompt": {
            "text": "Root?",
            "role": "prompter",
            "replies": [
                {
                    "text": "A1",
                    "role": "assistant",
                    "rank": 1,
                    "replies": [
                        {
                            "text": "Follow-up?",
                            "role": "prompter",
                            "rank": 0,
                            "replies": [
                                {"text": "B1", "role": "assistant", "rank": 0, "replies": []},
                                {"text": "B2", "role": "assistant", "rank": 1, "replies": []},
                                {"text": "B3", "role": "assistant", "rank": 2, "replies": []},
                            ],
                        }
                    ],
                },
                {"text": "A0", "role": "assistant", "rank": 0, "replies": []},
            ],
        },
    }
    ex, st = read_file(_write(tmp_path / "o.jsonl", [json.dumps(tree)]))
    assert st.examples == 2 and st.pairs == 1 + 3
    assert ex[0].responses == ["A1", "A0"] and ex[0].pairs() == [(1, 0)]
    assert [m["content"] for m in ex[1].prompt] == ["Root?", "A1", "Follow-up?"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "o.jsonl:2"),
        (json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"}), "'chosen' must be a string"),
        (json.dumps({"prompt": "x", "responses": ["a"], "ranking": [0]}), "at least 2"),
        (json.dumps({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]}), "every response index"),
        (
            json.dumps({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}),
            "allowed roles",
        ),
        (json.dumps({"foo": 1}), "cannot tell the format"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, line: str, match: str) -> None:
    # The first line fixes the file's format; the good line is of the bad line's format.
    if "responses" in line:
        good = json.dumps({"prompt": "x", "responses": ["a", "b"], "ranking": [1, 0]})
    elif "foo" in line:
        good = ""  # a blank first line: the bad line is the one the format is detected from
    else:
        good = json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"})
    src = _write(tmp_path / "o.jsonl", [good, line])
    with pytest.raises(DataError, match=match) as e:
        read_file(src)
    assert "o.jsonl:2" in str(e.value)
    ex, st = read_file(src, skip_bad=True)
    assert st.skipped_bad == 1 and len(ex) == (0 if good == "" else 1)


def test_split_is_deterministic_and_by_prompt() -> None:
    exs = [RankedExample([{"role": "user", "content": f"p{i % 50}"}], ["a", "b"], [0, 1]) for i in range(200)]
    tr1, dv1 = split_dev(exs, 0.2, seed=1)
    _, dv2 = split_dev(exs, 0.2, seed=1)
    assert [id(e) for e in dv1] == [id(e) for e in dv2] and 0 < len(dv1) < 200
    assert not {e.prompt_key() for e in tr1} & {e.prompt_key() for e in dv1}


@pytest.mark.skipif(not (SHARED / "oasst" / "en_100_tree.jsonl").exists(), reason="shared OpenAssistant data is absent")
def test_real_oasst_counts() -> None:
    ex, st = read_file(SHARED / "oasst" / "en_100_tree.jsonl")
    assert st.examples == 212 and st.pairs == 754
    assert max(len(e.responses) for e in ex) <= 9
