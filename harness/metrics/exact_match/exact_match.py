"""Exact match of generated text with the reference, after stripping surrounding white space."""

import datasets
import evaluate

_DESCRIPTION = """
Fraction of predictions equal to their reference after `str.strip()` on both.
Returns {"exact_match": float in [0, 1], "per_example": each example's value, whose mean it is}.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings.
Returns:
    exact_match: the fraction of exact matches.
Examples:
    >>> metric.compute(predictions=["19", " 7"], references=["19", "8"])
    {'exact_match': 0.5}
"""


class ExactMatch(evaluate.Metric):
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
        per_example = [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]
        return {"exact_match": sum(per_example) / len(per_example) if per_example else 0.0,
                "per_example": per_example}
