"""Exact match of the final number of a generated answer with the reference's (GSM8K-style)."""

import re

import datasets
import evaluate

_DESCRIPTION = """
Fraction of predictions whose final number equals the reference's final number.

The number taken from a text is the one after its first answer marker ("The answer is",
"answer:", "####") if it has one, else its last number. Numbers are compared as values:
thousands separators, a currency sign and trailing zeros after a decimal point are ignored
("1,234" = "1234", "42.0" = "42", "$5" = "5"). A text without a number never matches.
Returns {"number_match": float in [0, 1], "per_example": each example's value, whose mean it is}.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (a number, or a worked answer ending in one).
Returns:
    number_match: the fraction of matches.
Examples:
    >>> metric.compute(predictions=["The answer is 1,234.", "42.0", "7"], references=["1234", "#### 42", "8"])
    {'number_match': 0.6666666666666666}
"""

NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
MARKER = re.compile(r"(?:answer\s*(?:is|:)|####)\s*:?\s*(" + NUMBER + ")", re.IGNORECASE)


def final_number(text: str):
    """The answer's number as a normalized string ("1,234.50" -> "1234.5"), or None."""
    found = MARKER.search(text)
    if found:
        raw = found.group(1)
    else:
        numbers = re.findall(NUMBER, text)
        if not numbers:
            return None
        raw = numbers[-1]
    raw = raw.replace(",", "").replace("$", "").replace(" ", "")
    if "." in raw:
        raw = raw.rstrip("0").rstrip(".")
    if raw in ("-0", ""):
        raw = "0"
    return raw


class NumberMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        per_example = []
        for p, r in zip(predictions, references):
            want = final_number(r)
            per_example.append(float(want is not None and final_number(p) == want))
        return {"number_match": sum(per_example) / len(per_example) if per_example else 0.0,
                "per_example": per_example}
