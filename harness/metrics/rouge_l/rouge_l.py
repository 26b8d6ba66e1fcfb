"""ROUGE-L F1 of generated text against a reference, computed by Google's `rouge_score`."""

import datasets
import evaluate

_DESCRIPTION = """
Mean ROUGE-L F-measure (longest common subsequence of words, after rouge_score's default
tokenization: lower case, letters and digits only, Porter stemming) of each prediction
against its reference. Suited to free-text answers (instruction following, summaries).
Returns {"rouge_l": float in [0, 1], "per_example": each example's value, whose mean it is}.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings.
Returns:
    rouge_l: the mean ROUGE-L F1.
Examples:
    >>> metric.compute(predictions=["the cat sat"], references=["the cat sat down"])
    {'rouge_l': 0.8571428571428571}
"""


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0, "per_example": scores}
