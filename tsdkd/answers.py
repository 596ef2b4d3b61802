"""Final-answer extraction and checking, shared by stage 1 (ranking) and `tsdkd eval`.

The common forms, most explicit first: `\\boxed{...}`, GSM8K's `#### N`, `Answer: N`, then the
last number in the text. Equivalence (2/4 == 0.5, 1,000 == 1000) is math-verify's.
"""

from __future__ import annotations

import re

_HASHES = re.compile(r"####\s*([^\n]+)")
# An answer in $$...$$ or $...$ ends at its closing dollars (`\$` inside is a dollar sign); otherwise it may open with
# a currency $ ("$12.50"), and it ends at the line's end, "because"/"since", or a full stop before a space that ends no
# abbreviation ("12. It is even", "25%. So"; not "Dr. Smith", "U.S. Army", "3 a.m. on").
_DOLLARS = r"\$\$[^$\n]+\$\$|\$(?:\\\$|[^$\n])+\$"
_ABBREVIATION_END = "".join(rf"(?<!\b{word})" for word in ("dr", "mr", "mrs", "ms", "st", "jr", "sr", "vs", "etc", "no")) + r"(?<!\b[a-z])"
_MARKED = rf"({_DOLLARS}|\$?[^\s$*:](?:(?!{_ABBREVIATION_END}\.\s|[ \t]+(?:because|since)\b)[^\n$])*)"
# In a response, "answer is", "answer:" or "answer =" anywhere ("Therefore, the answer is 72."), the answer on its line
# or on the next one that holds something ("The answer is:\n\n$\frac{3}{4}$"); the word alone marks nothing ("to get the
# answer, add 5 and 3").
_ANSWER = re.compile(rf"\banswer[ \t]*(?:is\b[ \t]*:?|[:=])[ \t*]*(?:\n[ \t*]*)*{_MARKED}", re.IGNORECASE)
# In a gold solution only a line that starts with it ("Answer: 5", "The answer is: B", "**Final answer:** 12") and goes
# on to the answer on the same line: the word "answer" inside the reasoning marks nothing. The mark may come twice
# (Minerva's "Final Answer: The final answer is $5$. I hope it is correct.").
_GOLD_MARK = r"(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?:is\b[ \t]*:?|:)[ \t*]*"
_GOLD_ANSWER = re.compile(rf"^[ \t]*\**[ \t]*{_GOLD_MARK}(?:{_GOLD_MARK})?{_MARKED}", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# A number and words only: a unit or the things counted ("72 clips", "12 square meters"), which the number answers;
# unless a word changes the value ("2 and a half", "5 hundred", "3 times", "2 pi", "3 x") or joins another answer.
_NUMBER_AND_WORDS = re.compile(rf"({_NUMBER.pattern})[ \t]+([a-z][a-z \t]*)", re.IGNORECASE)
_VALUE_WORDS = {"and", "or", "to", "by", "plus", "minus", "times", "over", "divided", "half", "halves", "quarter", "quarters",
                "third", "thirds", "fourth", "fourths", "fifth", "fifths", "hundred", "hundreds", "thousand", "thousands",
                "million", "millions", "billion", "billions", "trillion", "dozen", "dozens", "pi", "sqrt", "root",
                "squared", "cubed", "percent"}


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index].strip()
    return None


def _marked_answer(text: str, answer_mark: re.Pattern[str] = _ANSWER) -> str | None:
    """The answer a text marks as final: the last \\boxed{}, else the last `#### N`, else the last `answer_mark`."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for pattern in (_HASHES, answer_mark):
        matches = pattern.findall(text)
        if matches:
            # Bold marks, a full stop, the $ of a gold answer's $...$.
            answer = matches[-1].strip().strip("*").strip().rstrip(".").strip("$").strip()
            return _counted_number(answer) or answer or None
    return None


def _counted_number(answer: str) -> str | None:
    """The number of an answer that is a number and the unit or things it counts ("72 clips"), else None."""
    number_and_words = _NUMBER_AND_WORDS.fullmatch(answer)
    if not number_and_words:
        return None
    words = number_and_words.group(2).lower().split()
    return None if any(len(word) == 1 or word in _VALUE_WORDS for word in words) else number_and_words.group(1)


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the marked one, else its last number; None when there is none."""
    marked = _marked_answer(text)
    if marked:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answers_match(gold: str, predicted: str) -> bool:
    """math-verify's equivalence of two extracted answers (plain numbers or LaTeX)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}")
    predicted_parsed = parse(f"\\boxed{{{predicted}}}")
    if gold_parsed and predicted_parsed:
        return bool(verify(gold_parsed, predicted_parsed))
    return gold.replace(",", "").strip() == predicted.replace(",", "").strip()


def gold_final_answer(gold_answer: str) -> str:
    """A gold field is a bare answer ("72", "\\frac{1}{2}") or a solution whose answer is marked (\\boxed{}, ####, a
    line starting `Answer:`); anything else is compared whole."""
    return _marked_answer(gold_answer, _GOLD_ANSWER) or gold_answer.strip()


def unmarked_solution(gold_answer: str) -> bool:
    """A gold field of several lines with no final answer marked: compared whole, no response could match it."""
    return "\n" in gold_answer.strip() and _marked_answer(gold_answer, _GOLD_ANSWER) is None


def answer_is_correct(gold_answer: str, response: str) -> bool:
    """True when the response's final answer equals the gold answer's final answer."""
    gold = gold_final_answer(gold_answer)
    predicted = extract_answer(response)
    return predicted is not None and answers_match(gold, predicted)
