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
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# In a response, "answer is", "answer:" or "answer =" anywhere ("Therefore, the answer is 72."); the word alone marks
# nothing ("to get the answer, add 5 and 3"). The answer is on the mark's line, or, where the mark ends its line, the
# next line that holds something if that line is a bare answer: math in delimiters, a choice "(B)", a number with words
# ("The answer is:\n\n$\frac{3}{4}$"); prose there is reasoning, not the answer.
_RESPONSE_MARK = r"\banswer[ \t]*(?:is\b[ \t]*:?|[:=])[ \t*]*"
_ANSWER = re.compile(rf"{_RESPONSE_MARK}{_MARKED}", re.IGNORECASE)
_ANSWER_NEXT_LINE = re.compile(
    rf"{_RESPONSE_MARK}(?:\n[ \t*]*)+({_DOLLARS}|\\\[[^\n]*?\\\]|\\\([^\n]*?\\\)|\(?[A-Ea-e]\)|\$?{_NUMBER.pattern}(?:[ \t]+[a-z][a-z \t]*)?)"
    r"[ \t*]*\.?[ \t]*$", re.IGNORECASE | re.MULTILINE)
# In a gold solution only a line that starts with it ("Answer: 5", "The answer is: B", "**Final answer:** 12") and goes
# on to the answer on the same line: the word "answer" inside the reasoning marks nothing. The mark may come twice
# (Minerva's "Final Answer: The final answer is $5$. I hope it is correct.").
_GOLD_MARK = r"(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?:is\b[ \t]*:?|:)[ \t*]*"
_GOLD_ANSWER = re.compile(rf"^[ \t]*\**[ \t]*{_GOLD_MARK}(?:{_GOLD_MARK})?{_MARKED}", re.IGNORECASE | re.MULTILINE)
# A number and words only: a unit or the things counted ("72 clips", "12 square meters", "3 quarters", "5 a day"),
# which the number answers; unless the words change its value: a magnitude or power right after it ("6 hundred",
# "4 squared", "2 pi"), a fraction after "and" ("2 and a half"), or a lone letter, a variable ("3 x"; not "6 g of sugar").
_NUMBER_AND_WORDS = re.compile(rf"({_NUMBER.pattern})[ \t]+([a-z][a-z \t]*)", re.IGNORECASE)
_MAGNITUDES = {"hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion", "billions", "trillion",
               "squared", "cubed", "pi", "sqrt", "root", "percent"}
_FRACTIONS = {"half", "halves", "third", "thirds", "quarter", "quarters", "fourth", "fourths", "fifth", "fifths"}


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


def _marked_answer(text: str, answer_marks: tuple[re.Pattern[str], ...] = (_ANSWER, _ANSWER_NEXT_LINE)) -> str | None:
    """The answer a text marks as final: the last \\boxed{}, else the last `#### N`, else the last of `answer_marks`."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for patterns in ((_HASHES,), answer_marks):
        matches = sorted((match.start(), match.group(1)) for pattern in patterns for match in pattern.finditer(text))
        if matches:
            # Bold marks, a full stop, the $ of a gold answer's $...$.
            answer = matches[-1][1].strip().strip("*").strip().rstrip(".").strip("$").strip()
            return _counted_number(answer) or answer or None
    return None


def _counted_number(answer: str) -> str | None:
    """The number of an answer that is a number and the unit or things it counts ("72 clips"), else None."""
    number_and_words = _NUMBER_AND_WORDS.fullmatch(answer)
    if not number_and_words:
        return None
    words = number_and_words.group(2).lower().split()
    after_and = words[words.index("and") + 1:] if "and" in words else []
    changes_value = (words[0] in _MAGNITUDES or any(word in _FRACTIONS for word in after_and)
                     or (len(words) == 1 and len(words[0]) == 1 and words[0] != "a"))
    return None if changes_value else number_and_words.group(1)


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


def same_gold_answer(first: str | None, other: str | None) -> bool:
    """Whether two gold fields (or two missing ones) give the same final answer."""
    if first is None or other is None:
        return first is other
    return answers_match(gold_final_answer(first), gold_final_answer(other))


def gold_final_answer(gold_answer: str) -> str:
    """A gold field is a bare answer ("72", "\\frac{1}{2}") or a solution whose answer is marked (\\boxed{}, ####, a
    line starting `Answer:`); anything else is compared whole."""
    return _marked_answer(gold_answer, (_GOLD_ANSWER,)) or gold_answer.strip()


def unmarked_solution(gold_answer: str) -> bool:
    """A gold field of several lines with no final answer marked: compared whole, no response could match it."""
    return "\n" in gold_answer.strip() and _marked_answer(gold_answer, (_GOLD_ANSWER,)) is None


def answer_is_correct(gold_answer: str, response: str) -> bool:
    """True when the response's final answer equals the gold answer's final answer."""
    gold = gold_final_answer(gold_answer)
    predicted = extract_answer(response)
    return predicted is not None and answers_match(gold, predicted)
