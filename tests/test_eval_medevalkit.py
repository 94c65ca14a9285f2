"""`eval.scoring: medevalkit` against MedEvalKit's rules (lingshu_fast/eval/medevalkit.py, scoring.py).

The peer is MedEvalKit itself (alibaba-damo-academy/MedEvalKit utils/utils.py, utils/<BENCH>/<BENCH>.py,
utils/MMMU/eval_utils.py, mathruler's extract_boxed_content), which cannot be installed here (it
imports vllm, openai, google-genai at module level). So this file restates those rules in the
plainest form — str.split where MedEvalKit splits, a separate brace counter for mathruler — without
touching our implementation, then:
- property tests: thousands of generated responses per task type (letters in every decoration,
  answer phrases, joined and unclosed <answer> spans, nested/unclosed/"None" boxes, paragraphs,
  option texts and near misses, yes/no look-alikes, Chinese, empty text) must get the same verdict
  from `score_item(..., scoring="medevalkit")` and from the restatement. Agreement must be exact:
  any disagreement is a benchmark item we would score differently from Lingshu's table.
- hand-written cases, one per quirk MedEvalKit has, so a reader sees each rule pinned.
"""
import difflib
import random

import pytest

from lingshu_fast.eval.scoring import score_item

# --------------------------------------------------------------------------- the restatement


def ref_boxed(text):
    """mathruler.grader.extract_boxed_content."""
    i = text.rfind("\\boxed{")
    if i == -1:
        return "None"
    rest = text[i + len("\\boxed{"):]
    level = 0
    for pos, c in enumerate(rest):
        level += {"{": 1, "}": -1}.get(c, 0)
        if level == -1:
            return rest[:pos].strip()
    return "None"


def ref_extract(text, tag):
    """utils.extract(text, tag, hard=True)."""
    if not text:
        return ""
    o, c = f"<{tag}>", f"</{tag}>"
    out, pos = "", text.find(o)
    while pos != -1:
        end = text.find(c, pos + len(o))
        if end == -1:
            break
        out += text[pos + len(o):end] + " "
        pos = text.find(o, end + len(c))
    return out.strip() or text


PATTERNS = ["**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
            "final answer", "final answer is"]


def ref_parse(response):
    response = response.lower()
    if "boxed" in response:
        response = ref_boxed(response)
    elif "<answer>" in response:
        response = ref_extract(response, "answer")
    for p in PATTERNS:
        if p in response:
            response = response.split(p)[-1]
    return response


def ref_multi_choice(choices, answer, response):
    response = response.lower()
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    if response.split("\n\n")[0] in alphas:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in alphas:
        response = response.split("\n\n")[-1].split(".")[0]
    response = ref_parse(response)
    choices = [c.lower() for c in choices]
    response = response.strip().lower().replace("\n", "")
    split = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if split == answer:
        return True
    if split in alphas:
        return choices[ord(split) - ord("a")] == answer
    if split in choices:
        return answer in alphas and split == choices[ord(answer) - ord("a")]
    best, best_i = 0, 0
    for i, c in enumerate(choices):
        s = difflib.SequenceMatcher(None, c, response).ratio()
        if s > best:
            best, best_i = s, i
    return alphas[best_i] == answer or choices[best_i] == answer


def ref_judgement(answer, response):
    response = ref_parse(response).replace("\n", "").replace(".", "")
    return (("yes" in response) ^ ("no" in response)) and answer.lower() in response


def ref_close(answer, response):
    return ref_parse(response).replace("\n", "").replace(".", "") == answer.lower()


def ref_span(response):
    """VQA_RAD / PATH_VQA / SLAKE cal_metrics: boxed first, else the <answer> spans."""
    if ref_boxed(response) != "None":
        return ref_boxed(response)
    if "<answer>" in response:
        return ref_extract(response, "answer")
    return response


def ref_vqa(answer, response):
    response = ref_span(response).lower().strip()
    answer = answer.lower().strip()
    if answer in ["yes", "no"]:
        return ref_judgement(answer, response)
    return ref_parse(response) == answer.lower()


def ref_slake(answer, answer_type, response):
    response = ref_span(response)
    if answer_type == "OPEN":
        return ref_parse(response) == answer.lower()
    if answer in ["yes", "no"]:
        return ref_judgement(answer, response)
    return ref_close(answer, response)


def ref_mmmu_choice(response, all_choices, index2ans, rng):
    if "<answer>" in response:
        response = ref_extract(response, "answer")
    elif "\\boxed" in response:
        response = ref_boxed(response)
    response = response.strip()
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    index_ans, brack, cands = True, False, []
    for c in all_choices:
        if f"({c})" in response:
            cands.append(c)
            brack = True
    if not cands:
        cands = [c for c in all_choices if f" {c} " in response]
    if not cands and len(response.split()) > 5:
        for k, v in index2ans.items():
            if v.lower() in response.lower():
                cands.append(k)
                index_ans = False
    if not cands:
        return rng.choice(all_choices)
    if len(cands) == 1:
        return cands[0]
    if index_ans:
        pos = [response.rfind(f"({c})") if brack else response.rfind(f" {c} ") for c in cands]
    else:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[max(range(len(pos)), key=lambda i: (pos[i], -i))]


def ref_norm(s):
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def ref_mmmu(mek, response, seed):
    if "<answer>" in response:
        response = ref_extract(response, "answer")
    if ref_boxed(response) != "None":
        response = ref_boxed(response)
    if mek["question_type"] == "multiple-choice":
        return ref_mmmu_choice(response, mek["all_choices"], mek["index2ans"], random.Random(seed)) == mek["answer"]
    golds = ref_norm(mek["answer"])
    return any(isinstance(g, str) and g in ch for ch in response for g in golds)  # eval_open over characters


# --------------------------------------------------------------------------- generators

WORDS = ["pneumonia", "liver", "left lung", "CT", "MRI", "not", "normal", "node", "nodule", "none", "yes", "no",
         "Yes", "No", "YES", "the", "a", "answer", "Answer", "boxed", "is", "correct", "option", "3.5 mg",
         "type 2: mild", "是", "否", "None", "right", "kidney", "brain", "2", "0.5", "1,200", "x-ray"]
TEXTS = ["Pneumonia", "Viral pneumonia", "Tuberculosis", "Lung cancer", "Normal", "Type 2: mild", "3.5 mg",
         "None of the above", "Left", "Right kidney", "CT scan", "MRI of the brain"]


def _noise(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))


def _wrap(rng, core):
    kind = rng.randrange(24)
    noise = _noise(rng)
    return [
        lambda: core, lambda: f"The answer is {core}", lambda: f"answer: {core}", lambda: f"**Answer**: {core}",
        lambda: f"Final answer: {core}.", lambda: f"答案:{core}", lambda: f"<answer>{core}</answer>",
        lambda: f"<think>{noise}</think><answer>{core}</answer>", lambda: f"<answer>{core}</answer> x <answer>{noise}</answer>",
        lambda: f"<answer>{core}", lambda: f"<answer></answer>{core}", lambda: f"\\boxed{{{core}}}",
        lambda: f"{noise} \\boxed{{\\text{{{core}}}}}", lambda: f"\\boxed{{{core}", lambda: f"\\boxed{{None}} {core}",
        lambda: f"{noise}\n\n{core}", lambda: f"{core}\n\n{noise}", lambda: f"{core}. {noise}",
        lambda: f"unboxed {core}", lambda: f"{noise}: {core}", lambda: f"  {core.upper()}  ", lambda: f"{core}\n",
        lambda: f"\\boxed{{{{{noise}}} {core}}}", lambda: f"\\boxed{{{core}}} {noise} }}",
    ][kind]()


def _response(rng, cores):
    text = rng.choice(cores)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        text = _wrap(rng, text)
    return text


def _mcq_case(rng):
    n = rng.randint(2, 10)
    texts = rng.sample(TEXTS, min(n, len(TEXTS)))
    n = len(texts)
    fmt = rng.choice(["{k}. {v}", "{k}.{v}", " {k}: {v} "])
    choices = [fmt.format(k="ABCDEFGHIJ"[i], v=t) for i, t in enumerate(texts)]
    answer = rng.choice(["ABCDEFGHIJ"[rng.randrange(n)]] * 4 + [rng.choice(texts), "ABCDEFGHIJ"[rng.randrange(n)].lower()])
    letter = rng.choice("ABCDEFGHIJK")
    cores = [letter, letter.lower(), f"({letter})", f"{letter}.", f"{letter})", f"**{letter}**",
             f"{letter}. {rng.choice(texts)}", f"{letter}: {rng.choice(texts)}", rng.choice(texts),
             rng.choice(texts).lower()[:-1], rng.choice(choices), "", " ", _noise(rng), f"{letter} and {rng.choice('ABCD')}"]
    return choices, answer, _response(rng, cores)


FLOW_CASES = 3000


@pytest.mark.parametrize("flow", ["mcq", "mcq_raw"])
def test_multiple_choice_agrees_with_medevalkit(flow):
    """judge_multi_choice, after the flow's span (joined <answer> spans for `mcq`, raw for `mcq_raw`)."""
    rng = random.Random(f"mcq-{flow}")
    agree = 0
    for i in range(FLOW_CASES):
        choices, answer, response = _mcq_case(rng)
        expected = ref_multi_choice(choices, answer, ref_extract(response, "answer") if flow == "mcq" else response)
        item = {"question": "q", "task": "mcq", "flow": flow, "mek": {"choices": choices, "answer": answer}}
        got, _ = score_item(response, item)
        agree += got == expected
        assert got == expected, (choices, answer, response)
    assert agree == FLOW_CASES


def _vqa_case(rng):
    gold = rng.choice(["yes", "no", "Yes", "No", "liver", "left lung", "CT", "2", "x-ray", "是", "the liver"])
    cores = [gold, gold.upper(), gold + ".", f"the {gold}", f"{gold} is seen", "not", "normal", "nodule", "none",
             "yes and no", "There is no evidence", "Yes, there is", "", _noise(rng), f"{gold}\n", f" {gold}"]
    return gold, _response(rng, cores)


def test_vqa_flow_agrees_with_medevalkit():
    """VQA-RAD / PathVQA: boxed-then-<answer>, yes/no by judge_judgement, else open exact match."""
    rng = random.Random("vqa")
    for _ in range(FLOW_CASES):
        gold, response = _vqa_case(rng)
        item = {"question": "q", "task": "open", "flow": "vqa", "mek": {"answer": gold}}
        assert score_item(response, item)[0] == ref_vqa(gold, response), (gold, response)


def test_slake_flow_agrees_with_medevalkit():
    """SLAKE: OPEN exact; CLOSED judge_judgement only for a literal yes/no gold, else exact without '.'/newlines."""
    rng = random.Random("slake")
    for _ in range(FLOW_CASES):
        gold, response = _vqa_case(rng)
        kind = rng.choice(["OPEN", "CLOSED"])
        item = {"question": "q", "task": "open", "flow": "slake", "mek": {"answer": gold, "answer_type": kind}}
        assert score_item(response, item)[0] == ref_slake(gold, kind, response), (gold, kind, response)


def test_mmmu_flow_agrees_with_medevalkit():
    """MMMU's own parser (incl. its seeded random pick) and the val flow's character-wise eval_open."""
    rng = random.Random("mmmu")
    for i in range(FLOW_CASES):
        if rng.random() < 0.75:
            texts = rng.sample(TEXTS, rng.randint(2, 6))
            letters = list("ABCDEF"[:len(texts)])
            mek = {"question_type": "multiple-choice", "answer": rng.choice(letters), "all_choices": letters,
                   "index2ans": dict(zip(letters, texts))}
            long = f"I think the finding is {rng.choice(texts)} and not {rng.choice(texts)} here"
            cores = [rng.choice(letters), f"({rng.choice(letters)})", f"{rng.choice(letters)}.", long,
                     f"({rng.choice(letters)}) or ({rng.choice(letters)})", rng.choice(texts), _noise(rng), ""]
        else:
            mek = {"question_type": "open", "answer": rng.choice(["24", "liver", "1,200", "", " x ", "0.5"])}
            cores = [mek["answer"], _noise(rng), "liver", "24", ""]
        response = _response(rng, cores)
        item = {"question": "q", "task": "open", "flow": "mmmu", "mek": mek, "benchmark": "MMMU-Med", "id": i}
        assert score_item(response, item)[0] == ref_mmmu(mek, response, f"MMMU-Med:{i}"), (mek, response)


# --------------------------------------------------------------------------- one case per quirk

CH = ["A. Pneumonia", "B. Viral pneumonia", "C. Tuberculosis", "D. Lung cancer"]


def _mcq(response, answer="C", flow="mcq", choices=CH):
    return score_item(response, {"question": "q", "task": "mcq", "flow": flow,
                                 "mek": {"choices": choices, "answer": answer}})[0]


@pytest.mark.parametrize("response,answer,flow,correct", [
    ("c", "C", "mcq", True),                                   # lower-cased before comparing
    ("Because of the cavity.\n\nC", "C", "mcq", True),         # bare letter as the last paragraph wins
    ("C\n\nThough D is possible", "C", "mcq", True),           # ... or as the first paragraph
    ("C. Tuberculosis is typical", "C", "mcq", True),          # text before the first "."
    ("Reasoning: several. Final: C", "C", "mcq", False),       # cut before the first "." -> "reasoning"
    ("My pick:C", "C", "mcq", True),                           # after the last ":"
    ("My pick: C", "C", "mcq", False),                         # ... space kept: " c" is no letter
    ("The answer is C", "C", "mcq", True),                     # cut after the answer phrase (" c" -> strip)
    ("<answer>A</answer><answer>C</answer>", "C", "mcq", False),   # spans joined: "a c" -> similarity
    ("\\boxed{C} <answer>A</answer>", "C", "mcq_raw", True),   # boxed read before <answer>
    ("<answer>\\boxed{C}</answer>", "C", "mcq", True),
    ("", "A", "mcq", True),                                    # empty: all ratios 0 -> the first choice
    ("", "C", "mcq", False),
    ("tuberculosis", "C", "mcq", True),                        # letterless: most similar full choice string
    ("(C)", "C", "mcq", False),                                # decorated letters are not read: similarity
    ("**C**", "C", "mcq", False),
    ("c. tuberculosis", "C", "mcq", True),
])
def test_multiple_choice_quirks(response, answer, flow, correct):
    assert _mcq(response, answer, flow) is correct


def test_similarity_compares_full_choice_strings_with_prefix():
    """The difflib fallback compares with "A. text" (prefix included) and the whole parsed text."""
    choices = ["A. cat", "B. dog"]
    assert _mcq("dog", "B", choices=choices) is True
    # "a. c" is nearer "A. cat" than "B. dog" only because of the prefix
    assert _mcq("a, c", "A", choices=choices) is True


@pytest.mark.parametrize("gold,response,correct", [
    ("no", "not seen", True), ("no", "normal", True), ("no", "There is a nodule", True),   # substring "no"
    ("no", "None", True), ("yes", "yes, no doubt", False),      # both substrings -> wrong
    ("yes", "Present", False),                                  # no synonyms
    ("no", "\\boxed{No.}", True), ("yes", "<answer>yes</answer> maybe", True),
])
def test_yes_no_quirks(gold, response, correct):
    item = {"question": "q", "task": "yesno", "flow": "vqa", "mek": {"answer": gold}}
    assert score_item(response, item)[0] is correct


@pytest.mark.parametrize("gold,response,correct", [
    ("liver", "liver", True), ("liver", "Liver", True),        # case: the response is lower-cased
    ("liver", "liver.", False), ("liver", "the liver", False),  # punctuation, articles matter
    ("liver", "answer: liver", False),                          # the cut keeps the space
    ("liver", "answer:liver", True), ("liver", " liver ", True),  # vqa strips before parsing
    ("liver", "\\boxed{liver} <answer>kidney</answer>", True),
])
def test_open_exact_match_without_normalisation(gold, response, correct):
    item = {"question": "q", "task": "open", "flow": "vqa", "mek": {"answer": gold}}
    assert score_item(response, item)[0] is correct


def test_slake_closed_rule():
    """Closed questions: judge_judgement only for a gold literally 'yes'/'no'; 'Yes' or 'Left' are
    exact matches after dropping '.' and newlines."""
    def slake(gold, response, kind="CLOSED"):
        return score_item(response, {"question": "q", "task": "open", "flow": "slake",
                                     "mek": {"answer": gold, "answer_type": kind}})[0]
    assert slake("no", "not") is True
    assert slake("Yes", "yes") is True and slake("Yes", "yes, it is") is False
    assert slake("Left", "left.\n") is True and slake("Left", "left.", kind="OPEN") is False


def test_mmmu_parser_quirks():
    mek = {"question_type": "multiple-choice", "answer": "B", "all_choices": ["A", "B", "C"],
           "index2ans": {"A": "aorta", "B": "vena cava", "C": "pulmonary artery"}}

    def mmmu(response, m=mek):
        return score_item(response, {"question": "q", "task": "mcq", "flow": "mmmu", "mek": m,
                                     "benchmark": "MMMU-Med", "id": 7})[0]
    assert mmmu("(A) is wrong, (B) is right") is True            # the last bracketed letter
    assert mmmu("The vessel shown here is clearly the vena cava") is True   # option text, > 5 words
    assert mmmu("vena cava") in (True, False)                     # <= 5 words, no letter: random pick
    assert mmmu("<answer>B</answer> \\boxed{A}") is True          # <answer> before boxed
    open_mek = {"question_type": "open", "answer": "liver"}
    assert mmmu("liver", open_mek) is False                       # val flow: characters, never a match
