"""JSONL record parsing: the accepted shapes, path resolution, and one SkipReason per bad record."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from lingshu_fast.data.formats import (
    CAPTION_PROMPT,
    DataError,
    SampleError,
    SkipLog,
    SkipReason,
    load_records,
    parse_record,
    read_jsonl,
)


@pytest.fixture()
def image_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ["a.png", "b.png"]:
        Image.fromarray(np.full((30, 40), 128, np.uint8)).save(tmp_path / "imgs" / name)
    return tmp_path


def test_messages_record_and_relative_paths(image_dir):
    """Relative image paths resolve against the JSONL's folder (or image_root), and extra fields survive
    for RL/eval; a wrong base silently pointing elsewhere is the bug this pins."""
    rec = {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "x"}],
           "images": ["imgs/a.png"], "answer": "B"}
    s = parse_record(rec, base_dir=image_dir)
    assert s.images == [str(image_dir / "imgs" / "a.png")] and s.extra == {"answer": "B"}
    path = image_dir / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    rows = list(read_jsonl(path))
    assert [r[0] for r in rows] == [f"{path}:1", f"{path}:3"]  # blank line skipped, numbering kept
    assert rows[0][1].images == s.images
    other = image_dir / "elsewhere"
    other.mkdir()
    (other / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / "imgs" / "a.png")
    assert list(read_jsonl(path, image_root=str(other)))[0][1].images == [str(other / "imgs" / "a.png")]


def test_part_lists_sharegpt_and_captions(image_dir):
    """Content part lists, ShareGPT turns and caption pairs normalise to string content with <image>."""
    parts = {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                                       {"type": "text", "text": "describe"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "grey"}]}]}
    s = parse_record(parts, base_dir=image_dir)
    assert s.messages[0]["content"] == "<image>describe" and s.images == [str(image_dir / "imgs/a.png")]
    share = {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
             "images": ["imgs/b.png"]}
    assert parse_record(share, base_dir=image_dir).messages[1] == {"role": "assistant", "content": "a"}
    swift = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
             "images": [{"path": "imgs/b.png"}], "system": "Be brief."}
    s = parse_record(swift, base_dir=image_dir)
    assert s.images == [str(image_dir / "imgs/b.png")] and s.messages[0] == {"role": "system", "content": "Be brief."}
    cap = parse_record({"image": "imgs/a.png", "caption": "a grey square"}, base_dir=image_dir)
    assert cap.messages == [{"role": "user", "content": "<image>" + CAPTION_PROMPT},
                            {"role": "assistant", "content": "a grey square"}]


BAD = [
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
      "images": ["imgs/missing.png"]}, SkipReason.MISSING_IMAGE),
    ({"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}],
      "images": ["imgs/a.png"]}, SkipReason.IMAGE_COUNT_MISMATCH),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": ["imgs/a.png"]},
     SkipReason.IMAGE_COUNT_MISMATCH),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
     SkipReason.EMPTY_ASSISTANT),
    ({"image": "imgs/a.png", "caption": ""}, SkipReason.EMPTY_ASSISTANT),
    ({"messages": [{"role": "user", "content": "q"}]}, SkipReason.BAD_SCHEMA),
    ({"messages": [{"role": "doctor", "content": "q"}, {"role": "assistant", "content": "a"}]}, SkipReason.BAD_SCHEMA),
    ({"messages": []}, SkipReason.BAD_SCHEMA),
    ({"text": "hello"}, SkipReason.BAD_SCHEMA),
    ([1, 2], SkipReason.BAD_SCHEMA),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, SkipReason.BAD_SCHEMA),
]


@pytest.mark.parametrize("record,reason", BAD)
def test_each_bad_record_has_its_reason(image_dir, record, reason):
    """Every rejection carries the reason it is counted under; a wrong reason would mislead the
    metrics that tell users what is wrong with their data."""
    with pytest.raises(SampleError) as info:
        parse_record(record, base_dir=image_dir)
    assert info.value.reason is reason


def test_prompt_records_need_no_assistant(image_dir):
    """RL/eval prompts have no assistant turn: require_assistant=False accepts them."""
    s = parse_record({"messages": [{"role": "user", "content": "<image>q"}], "images": ["imgs/a.png"],
                      "answer": "A"}, base_dir=image_dir, require_assistant=False)
    assert s.extra["answer"] == "A"


def test_skips_are_counted_logged_and_strict_lists_all(image_dir, caplog):
    """Nothing is lost silently: each bad line is counted and logged with file:line; under strict the
    error lists every bad line of the file (not just the first) so one fix round suffices."""
    good = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
            "images": ["imgs/a.png"]}
    lines = [json.dumps(good), "{not json", json.dumps(BAD[0][0]), json.dumps(good), json.dumps(BAD[3][0])]
    path = image_dir / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skips = SkipLog()
    with caplog.at_level(logging.WARNING, logger="lingshu_fast.data.formats"):
        samples = load_records([path], skips=skips)
    assert len(samples) == 2 and [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert {k: v for k, v in skips.counts.items() if v} == {"bad_json": 1, "missing_image": 1, "empty_assistant": 1}
    assert f"{path}:2: bad_json" in caplog.text and f"{path}:5: empty_assistant" in caplog.text
    strict = SkipLog(strict=True)
    load_records([path], skips=strict)
    with pytest.raises(DataError) as info:
        strict.raise_if_strict()
    message = str(info.value)
    assert all(f"{path}:{n}" in message for n in (2, 3, 5)) and "data.strict=false" in message
    with pytest.raises(DataError, match="not found"):
        load_records([image_dir / "absent.jsonl"])
