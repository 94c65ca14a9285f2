"""Lingshu-7B's published accuracy per benchmark: the reference column of the eval report.

Source: the Lingshu technical report (LASA Team, "Lingshu: A Generalist Foundation Model for Unified
Multimodal Medical Understanding and Reasoning", arXiv 2506.07044), the Lingshu-7B rows of its
multimodal-VQA and text-QA tables, as published in MedEvalKit's README (assets/mm_eval.png and
assets/text_eval.png, alibaba-damo-academy/MedEvalKit). All were scored with MedEvalKit, so they
compare with `eval.scoring: medevalkit`. Notes: the table says "Medbullets" without op4/op5 and
"MMMU-Med" without the split (MedEvalKit scored only the validation split locally at the time).
"""
from __future__ import annotations

from typing import Optional

from lingshu_fast.eval.benchmark_files import name_key

SOURCE = "Lingshu-7B, arXiv 2506.07044 (tables in MedEvalKit's README)"

# benchmark -> accuracy in percent
LINGSHU_7B = {
    "MMMU-Med": 54.0, "VQA-RAD": 67.9, "SLAKE": 83.1, "PathVQA": 61.9, "PMC-VQA": 56.3,
    "OmniMedVQA": 82.9, "MedXpertQA-MM": 26.7,
    "MMLU-Med": 74.5, "PubMedQA": 76.6, "MedMCQA": 55.9, "MedQA-USMLE": 63.3, "Medbullets": 56.2,
    "MedXpertQA-Text": 16.5, "SuperGPQA-Med": 26.3,
}
# other names our loaders and users give the same benchmarks
_ALIASES = {"mmmu": "MMMU-Med", "mmmumedical": "MMMU-Med", "mmmumedicalval": "MMMU-Med",
            "pathvqa": "PathVQA", "medqa": "MedQA-USMLE", "medbulletsop4": "Medbullets",
            "medbulletsop5": "Medbullets", "supergpqa": "SuperGPQA-Med", "mmlumedical": "MMLU-Med"}
_BY_KEY = {name_key(k): v for k, v in LINGSHU_7B.items()}


def reported_accuracy(benchmark: str) -> Optional[float]:
    """Lingshu-7B's published accuracy (percent) for a benchmark name, or None."""
    key = name_key(benchmark)
    if key in _BY_KEY:
        return _BY_KEY[key]
    alias = _ALIASES.get(key)
    return LINGSHU_7B[alias] if alias else None
