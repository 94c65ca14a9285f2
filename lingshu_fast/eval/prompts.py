"""Prompts as MedEvalKit builds them (`utils/question_formats.py`, `utils/MMMU/data_utils.py` and each
benchmark's construct_messages), wording, spacing and blank lines included: prompt templates move
accuracy, so a user comparing with Lingshu's table must send the same text.

`reasoning=True` is MedEvalKit's REASONING=True: the instruction asks for the answer in "\\boxed{}".
Images are not part of these strings: `benchmark_files.build_eval_messages` puts one `<image>`
marker first (one image) or "<image_1>: <image><image_2>: <image>…" (several), as MedEvalKit's
Qwen2.5-VL wrapper lays out the user turn.
"""
from __future__ import annotations

from typing import Sequence

_BOXED = '"\\boxed{}"'

_MCQ_INSTRUCTION = {
    ("en", False): "Answer with the option's letter from the given choices directly.",
    ("en", True): f"Answer with the option's letter from the given choices and put the letter in one {_BOXED}.",
    ("zh", False): "请直接使用给定选项中的选项字母来回答该问题。",
    ("zh", True): f"请直接使用给定选项中的选项字母来回答该问题,并将答案包裹在{_BOXED}里",
}
_JUDGEMENT_INSTRUCTION = {
    ("en", False): "Please output 'yes' or 'no'(no extra output).",
    ("en", True): f'Please output "yes" or "no" and put the answer in one {_BOXED}.',
    ("zh", False): "请输出'是'或'否'(不要有任何其它输出)。",
    ("zh", True): "请输出'是'或'否'，并将答案放在一个'\\boxed{}'中。",
}
_CLOSE_INSTRUCTION = {
    ("en", False): "Answer the question using a single word or phrase.",
    ("en", True): f"Answer the question using a single word or phrase and put the answer in one {_BOXED}.",
    ("zh", False): "请用一个单词或者短语回答该问题。",
    ("zh", True): "请用一个单词或者短语回答该问题，并将答案放在一个'\\boxed{}'中。",
}
_OPEN_INSTRUCTION = {
    ("en", False): "Please answer the question concisely.",
    ("en", True): f"Please answer the question concisely and put the answer in one {_BOXED}.",
    ("zh", False): "请简要回答该问题。",
    ("zh", True): "请简要回答该问题，并将答案放在一个'\\boxed{}'中。",
}


def _pick(table: dict, lang: str, reasoning: bool) -> str:
    key = (lang, bool(reasoning))
    if key not in table:
        raise ValueError(f"no MedEvalKit prompt for language {lang!r} (en or zh)")
    return table[key]


def multiple_choice(question: str, choices: Sequence[str], *, reasoning: bool = False, lang: str = "en") -> str:
    """MedEvalKit's get_multiple_choice_prompt: the choices are listed as given (each benchmark
    writes its own letter prefix: "A. x", "A.x", " A: x")."""
    options = "\n".join(str(c) for c in choices)
    head = (f"\nQuestion: {question}\nOptions: \n{options}" if lang == "en"
            else f"\n问题： {question}\n选项： \n{options}")
    return head + "\n" + _pick(_MCQ_INSTRUCTION, lang, reasoning)


def judgement(question: str, *, reasoning: bool = False, lang: str = "en") -> str:
    return question + "\n" + _pick(_JUDGEMENT_INSTRUCTION, lang, reasoning)


def close_ended(question: str, *, reasoning: bool = False, lang: str = "en") -> str:
    return question + "\n" + _pick(_CLOSE_INSTRUCTION, lang, reasoning)


def open_ended(question: str, *, reasoning: bool = False, lang: str = "en") -> str:
    return question + "\n" + _pick(_OPEN_INSTRUCTION, lang, reasoning)


def mmmu(question: str, options: Sequence[str], question_type: str, *, reasoning: bool = False) -> str:
    """MMMU's construct_prompt as MedEvalKit carries it: "(A) option" lines for multiple choice,
    the question framed by blank lines and an 8-space line before the instruction."""
    if question_type == "multiple-choice":
        listed = "".join(f"({chr(ord('A') + i)}) {opt}\n" for i, opt in enumerate(options))
        return f"\n{question}\n\n{listed}\n\n        " + _pick(_MCQ_INSTRUCTION, "en", reasoning)
    return f"\n{question}\n\n        " + _pick(_CLOSE_INSTRUCTION, "en", reasoning)
