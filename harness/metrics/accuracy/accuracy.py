"""Accuracy of predicted class indices (e.g. the choice a model scores highest)."""

import datasets
import evaluate

_DESCRIPTION = """
Fraction of predictions equal to their reference label. Returns {"accuracy": float in [0, 1], "per_example": each example's value, whose mean it is}.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted class indices (int).
    references: list of true class indices (int).
Returns:
    accuracy: the fraction of correct predictions.
Examples:
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        per_example = [float(int(p) == int(r)) for p, r in zip(predictions, references)]
        return {"accuracy": sum(per_example) / len(per_example) if per_example else 0.0,
                "per_example": per_example}
