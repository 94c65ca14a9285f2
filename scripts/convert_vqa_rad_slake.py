#!/usr/bin/env python
"""Convert a VQA-RAD / SLAKE-style JSON file + image folder into a lingshu_fast benchmark JSONL.

Input: a JSON list of records with `image_name` (VQA-RAD) or `img_name` (SLAKE), `question`,
`answer` and `answer_type` (CLOSED | OPEN); other fields (qid, q_lang, modality, ...) are kept.
Output, one line per question: {"question", "answer", "images": [path relative to the output
file's folder], "task", "category", ...} where yes/no answers become task "yesno" and everything
else (CLOSED non-yes/no, OPEN) task "open" (normalised exact match, as MedEvalKit scores them);
`category` is "closed" or "open" from answer_type, so the report keeps MedEvalKit's split.

  python scripts/convert_vqa_rad_slake.py --json SLAKE/test.json --images SLAKE/imgs \
      --out benchmarks/slake.jsonl --lang en
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lingshu_fast.answers import normalize_yes_no

_IMAGE_KEYS = ("image_name", "img_name", "image")


def convert_records(records: list, image_dir: Path, out_path: Path, *, lang: str | None = None,
                    skip_missing: bool = False) -> dict:
    """Write the benchmark JSONL; returns counts {written, yesno, open, skipped_lang, missing_images}."""
    if not isinstance(records, list):
        raise SystemExit("error: the JSON file must hold a list of question records")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "yesno": 0, "open": 0, "skipped_lang": 0, "missing_images": 0}
    rows = []
    for i, rec in enumerate(records):
        where = f"record {i}"
        if lang and rec.get("q_lang", lang) != lang:
            counts["skipped_lang"] += 1
            continue
        image = next((rec[k] for k in _IMAGE_KEYS if rec.get(k)), None)
        if image is None or "question" not in rec or "answer" not in rec:
            raise SystemExit(f"error: {where} lacks an image name ({'/'.join(_IMAGE_KEYS)}), question or answer")
        image_path = image_dir / image
        if not image_path.is_file():
            counts["missing_images"] += 1
            if skip_missing:
                continue
            raise SystemExit(f"error: {where}: image not found: {image_path} (use --skip-missing to drop such items)")
        answer = str(rec["answer"]).strip()
        yes_no = normalize_yes_no(answer)
        task = "yesno" if yes_no is not None else "open"
        counts[task] += 1
        row = {k: v for k, v in rec.items() if k not in _IMAGE_KEYS and k not in ("answer_type",)}
        row.update(question=str(rec["question"]).strip(), answer=yes_no or answer, task=task,
                   category=str(rec.get("answer_type", "")).strip().lower() or None,
                   images=[os.path.relpath(image_path.resolve(), out_path.parent.resolve())])
        rows.append(row)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts["written"] = len(rows)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="VQA-RAD/SLAKE-style JSON list")
    parser.add_argument("--images", required=True, type=Path, help="folder the image names are relative to")
    parser.add_argument("--out", required=True, type=Path, help="benchmark JSONL to write")
    parser.add_argument("--lang", default=None, help="keep only records with this q_lang (SLAKE: en or zh)")
    parser.add_argument("--skip-missing", action="store_true", help="drop records whose image is missing")
    args = parser.parse_args(argv)
    try:
        records = json.loads(args.json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {args.json}: {err}")
    counts = convert_records(records, args.images, args.out, lang=args.lang, skip_missing=args.skip_missing)
    print(f"wrote {counts['written']} questions to {args.out} ({counts['yesno']} yes/no, {counts['open']} open; "
          f"skipped {counts['skipped_lang']} other-language, {counts['missing_images']} missing images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
