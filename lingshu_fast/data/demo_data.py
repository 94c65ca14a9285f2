"""A tiny, deterministic medical dataset for the demo and the tests (built in well under a second).

Images are synthetic "scans": a dark field, a grey body ellipse, and in most of them one bright round
"lesion" in one quadrant. Their size varies (56..112 px a side, some not multiples of 28), they come as
grey PNG, RGB JPEG and 16-bit DICOM (CT-like, with rescale slope/intercept and a window centre/width),
plus pydicom's own CT_small.dcm and MR_small.dcm when present on disk. Every answer is a function of
the image (lesion present? which quadrant? which modality?) or of the text (fixed medical facts), so a
tiny model can learn the tasks in a few dozen steps and the eval accuracy means something.

Files written under `out_dir` (image paths in the JSONL are relative to it):
  images/...                 the images (eval images are separate from training ones)
  captions.jsonl             stage 1: caption pairs {"image", "caption"}
  captions_varied.jsonl      stage 2: messages-format captions with varied prompts
  instruct.jsonl             stage 3: VQA yes/no, quadrant MCQ, two-image comparison, text-only QA
  rl.jsonl                   stage 4: verifiable prompts {"messages" (user only), "images", "answer", "task"}
  eval.jsonl                 benchmark {"question", "options", "answer", "images", "task"}
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np

QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]
LETTERS = "ABCD"
SIDES = [(56, 56), (84, 112), (112, 84), (112, 112), (70, 98), (98, 70)]
QUADRANT_QUESTION = ("Which quadrant contains the bright spot? "
                     "A. upper left B. upper right C. lower left D. lower right")
LESION_QUESTION = "Is there a lesion in this image? Answer yes or no."
MODALITY_QUESTION = "What is the imaging modality of this scan? A. CT B. MRI C. X-ray D. ultrasound"
TEXT_FACTS = [
    ("Which organ does a cardiologist treat?", "The heart."),
    ("Which organ does a nephrologist treat?", "The kidney."),
    ("Which organ does a hepatologist treat?", "The liver."),
    ("Which organ does a pulmonologist treat?", "The lung."),
    ("What does MRI stand for?", "Magnetic resonance imaging."),
    ("What does CT stand for?", "Computed tomography."),
    ("How many chambers does the human heart have?", "Four."),
    ("Which blood cells carry oxygen?", "Red blood cells."),
]
CAPTION_PROMPTS = ["Describe this image.", "Describe the findings in this medical image.",
                   "What does this image show?"]


def _scan(rng: np.random.Generator, height: int, width: int, quadrant: Optional[int]) -> np.ndarray:
    """A float image in [0, 1]: body ellipse with soft noise, optional bright disk in `quadrant`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    body = ((yy - cy) / (0.46 * height)) ** 2 + ((xx - cx) / (0.46 * width)) ** 2 <= 1.0
    image = np.where(body, 0.35, 0.05) + rng.normal(0.0, 0.02, size=(height, width))
    if quadrant is not None:
        row, col = divmod(quadrant, 2)
        ly = height * (0.3 + 0.4 * row) + rng.uniform(-2, 2)
        lx = width * (0.3 + 0.4 * col) + rng.uniform(-2, 2)
        radius = 0.12 * min(height, width)
        image = np.where((yy - ly) ** 2 + (xx - lx) ** 2 <= radius**2, 0.95, image)
    return np.clip(image, 0.0, 1.0)


def _write_png_or_jpeg(path: Path, image01: np.ndarray, rgb: bool) -> None:
    from PIL import Image

    grey = np.round(image01 * 255).astype(np.uint8)
    if rgb:  # a warm tint, as in a photograph rather than a radiograph
        pil = Image.fromarray(np.stack([grey, (grey * 0.85).astype(np.uint8), (grey * 0.7).astype(np.uint8)], -1))
        pil.save(path, quality=90)
    else:
        Image.fromarray(grey).save(path, optimize=False)


def _write_dicom(path: Path, image01: np.ndarray, index: int) -> None:
    """A CT-like 16-bit DICOM: stored = HU + 1024 (slope 1, intercept -1024), soft-tissue window."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.round(image01 * 1400.0 - 1000.0)  # background ~ air, body ~ soft tissue, lesion ~ bone
    stored = (hu + 1024).astype(np.uint16)
    uid = lambda kind: generate_uid(entropy_srcs=["lingshu_fast demo", kind, str(index)])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Demo^Synthetic", f"DEMO{index:03d}"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _pydicom_test_file(name: str) -> Optional[Path]:
    """A test file shipped inside pydicom, if on disk (never downloads)."""
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / name
    return path if path.is_file() else None


def _make_images(out: Path, prefix: str, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` synthetic images; every 6th has no lesion; formats cycle png, png, jpg, dcm."""
    made = []
    for i in range(count):
        height, width = SIDES[i % len(SIDES)]
        quadrant = None if i % 6 == 5 else int(rng.integers(0, 4))
        image01 = _scan(rng, height, width, quadrant)
        kind = ["png", "png", "jpg", "dcm"][i % 4]
        rel = f"images/{prefix}_{i:03d}.{kind}"
        if kind == "dcm":
            _write_dicom(out / rel, image01, i + (1000 if prefix == "eval" else 0))  # distinct UIDs
        else:
            _write_png_or_jpeg(out / rel, image01, rgb=kind == "jpg")
        made.append({"path": rel, "quadrant": quadrant, "modality": "CT" if kind == "dcm" else "X-ray"})
    return made


def _caption(im: dict) -> str:
    scan = "CT scan" if im["modality"] == "CT" else "synthetic scan"
    if im["quadrant"] is None:
        return f"A {scan} of normal tissue with no lesion."
    return f"A {scan} with a round bright lesion in the {QUADRANTS[im['quadrant']]} quadrant."


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_demo_dataset(out_dir: Union[str, Path], *, num_train_images: int = 48, num_eval_images: int = 16,
                       seed: int = 0) -> dict[str, Path]:
    """Write the demo dataset under `out_dir` (recreated from scratch) and return its file paths."""
    out = Path(out_dir)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = _make_images(out, "train", num_train_images, rng)
    held_out = _make_images(out, "eval", num_eval_images, rng)
    for name, modality, caption in [("CT_small.dcm", "CT", "A real axial CT slice."),
                                     ("MR_small.dcm", "MRI", "A real MRI slice.")]:
        src = _pydicom_test_file(name)
        if src is not None:
            shutil.copyfile(src, out / "images" / name)
            train.append({"path": f"images/{name}", "quadrant": None, "modality": modality, "caption": caption})

    captions = [{"image": im["path"], "caption": im.get("caption", _caption(im))} for im in train]
    varied = [{"messages": [{"role": "user", "content": "<image>" + CAPTION_PROMPTS[k % 3]},
                            {"role": "assistant", "content": im.get("caption", _caption(im))}],
               "images": [im["path"]]} for k, im in enumerate(train)]

    instruct = []
    synthetic = [im for im in train if "caption" not in im]
    for k, im in enumerate(train):
        if im["modality"] in ("CT", "MRI") and "caption" in im:
            instruct.append(_chat("<image>" + MODALITY_QUESTION, "A" if im["modality"] == "CT" else "B", [im]))
            continue
        present = im["quadrant"] is not None
        instruct.append(_chat("<image>" + LESION_QUESTION, "yes" if present else "no", [im]))
        if present:
            instruct.append(_chat("<image>" + QUADRANT_QUESTION, LETTERS[im["quadrant"]], [im]))
        other = synthetic[(k + 1) % len(synthetic)]
        if present != (other["quadrant"] is not None):  # exactly one of the pair has a lesion
            answer = "The first image shows a lesion." if present else "The second image shows a lesion."
            instruct.append(_chat("<image><image>Which image shows a lesion? Answer first or second.",
                                  answer, [im, other]))
    for question, answer in TEXT_FACTS:
        instruct.append(_chat(question, answer, []))
    instruct.append({"messages": [  # one multi-turn conversation
        {"role": "user", "content": "<image>" + LESION_QUESTION},
        {"role": "assistant", "content": "yes" if synthetic[0]["quadrant"] is not None else "no"},
        {"role": "user", "content": "What does CT stand for?"},
        {"role": "assistant", "content": "Computed tomography."}], "images": [synthetic[0]["path"]]})

    rl = []
    for im in synthetic:
        if im["quadrant"] is not None:
            rl.append({**_prompt("<image>" + QUADRANT_QUESTION, LETTERS[im["quadrant"]], [im], "quadrant"),
                       "options": QUADRANTS})
        rl.append(_prompt("<image>" + LESION_QUESTION, "yes" if im["quadrant"] is not None else "no", [im],
                          "lesion_presence"))

    bench = []
    for im in held_out:
        present = im["quadrant"] is not None
        bench.append({"question": "Is there a lesion in this image?", "options": ["yes", "no"],
                      "answer": "A" if present else "B", "images": [im["path"]], "task": "lesion_presence"})
        if present:
            bench.append({"question": "Which quadrant contains the bright spot?", "options": QUADRANTS,
                          "answer": LETTERS[im["quadrant"]], "images": [im["path"]], "task": "quadrant"})
    for question, answer in TEXT_FACTS[:4]:
        organs = ["The heart.", "The kidney.", "The liver.", "The lung."]
        bench.append({"question": question, "options": organs, "answer": LETTERS[organs.index(answer)],
                      "images": [], "task": "text_qa"})

    paths = {name: out / f"{name}.jsonl" for name in ("captions", "captions_varied", "instruct", "rl", "eval")}
    for name, rows in [("captions", captions), ("captions_varied", varied), ("instruct", instruct),
                       ("rl", rl), ("eval", bench)]:
        _write_jsonl(paths[name], rows)
    paths["images"] = out / "images"
    return paths


def _chat(question: str, answer: str, ims: list[dict]) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [im["path"] for im in ims]}


def _prompt(question: str, answer: str, ims: list[dict], task: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "images": [im["path"] for im in ims],
            "answer": answer, "task": task}
