"""The Lingshu evaluation suite, read from each benchmark's public release as MedEvalKit reads it.

`eval.benchmarks` entries may be: our JSONL file (`benchmark_files`), a release folder named like
the benchmark (`VQA_RAD/`, `SLAKE/`, `MedXpertQA/`, …), a folder holding several such folders (like
MedEvalKit's datasets path), or `NAME=PATH` to name the benchmark of a folder explicitly.

| benchmark | release read | items | flow |
| VQA-RAD | test split (Parquet / JSONL, image column) | all | vqa |
| SLAKE | test.json + imgs/ | all (en and zh) | slake |
| PathVQA | test split (Parquet shards, image column) | all | vqa |
| PMC-VQA | test_2.csv + figures/ (or images/) | all | mcq_raw |
| OmniMedVQA | QA_information/Open-access/*.json + images | all | mcq |
| MMMU-Med | <Subject>/validation-*.parquet, 5 Health & Medicine subjects | all | mmmu |
| MedXpertQA-MM / -Text | MM/test.jsonl + images/, Text/test.jsonl | all | mcq |
| MedQA-USMLE | test split (4 options) | all | mcq |
| MedMCQA | validation split (or the original dev.json) | all | mcq |
| PubMedQA | test split ({"data": {Question, Context, Options, Correct Option}}) | all | mcq |
| Medbullets-op4 / -op5 | train split (options dict, or opa…ope) or the CSV | all | mcq |
Each loader lives in `suite_loaders`; this module finds folders and dispatches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lingshu_fast.eval import suite_loaders as L
from lingshu_fast.eval.benchmark_files import BenchmarkError, load_benchmark, name_key

# folder / NAME= key -> loader
LOADERS = {
    "vqarad": L.load_vqa_rad, "slake": L.load_slake, "pathvqa": L.load_path_vqa, "pmcvqa": L.load_pmc_vqa,
    "omnimedvqa": L.load_omnimedvqa, "mmmu": L.load_mmmu_med, "mmmumed": L.load_mmmu_med,
    "mmmumedical": L.load_mmmu_med, "mmmumedicalval": L.load_mmmu_med,
    "medxpertqa": L.load_medxpertqa, "medxpertqamm": L.load_medxpertqa_mm,
    "medxpertqatext": L.load_medxpertqa_text, "medqa": L.load_medqa, "medqausmle": L.load_medqa,
    "medqausmle4options": L.load_medqa, "medmcqa": L.load_medmcqa, "pubmedqa": L.load_pubmedqa,
    "medbullets": L.load_medbullets, "medbulletsop4": L.load_medbullets, "medbulletsop5": L.load_medbullets,
}


def load_benchmarks(entry: Union[str, Path], *, image_cache: Optional[Path] = None,
                    reasoning: bool = False, image_root=None) -> list[dict]:
    """The items of one `eval.benchmarks` entry (a file, a release folder, a folder of release
    folders, or NAME=PATH). `image_cache` receives images embedded in Parquet files."""
    text = str(entry)
    name, _, rest = text.partition("=")
    if rest and name_key(name) in LOADERS:
        return _load_folder(Path(rest), LOADERS[name_key(name)], image_cache, reasoning)
    path = Path(text)
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise BenchmarkError(f"{path}: a benchmark file must be our JSONL format; for a release file "
                                 "give its folder (or NAME=FOLDER, e.g. vqa_rad=/data/vqa-rad)")
        return load_benchmark(path, image_root=image_root, reasoning=reasoning)
    if not path.is_dir():
        raise BenchmarkError(f"benchmark not found: {path}")
    loader = LOADERS.get(name_key(path.name))
    if loader is not None:
        return _load_folder(path, loader, image_cache, reasoning)
    children = sorted(p for p in path.iterdir() if p.is_dir() and name_key(p.name) in LOADERS)
    if not children:
        raise BenchmarkError(f"{path}: neither a benchmark release folder nor a folder of them; name the "
                             f"folder after its benchmark or write NAME={path} (NAME one of {', '.join(names())})")
    items = []
    for child in children:
        items.extend(_load_folder(child, LOADERS[name_key(child.name)], image_cache, reasoning))
    return items


def _load_folder(folder: Path, loader, image_cache: Optional[Path], reasoning: bool) -> list[dict]:
    if not folder.is_dir():
        raise BenchmarkError(f"benchmark folder not found: {folder}")
    items = loader(folder, cache=image_cache, reasoning=reasoning)
    if not items:
        raise BenchmarkError(f"{folder}: no questions found")
    return items


def names() -> list[str]:
    return sorted({"vqa_rad", "slake", "path_vqa", "pmc_vqa", "omnimedvqa", "mmmu", "medxpertqa",
                   "medxpertqa_mm", "medxpertqa_text", "medqa_usmle", "medmcqa", "pubmedqa", "medbullets"})
