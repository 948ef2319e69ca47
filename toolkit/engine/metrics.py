"""``ValLoss``: mean next-token loss over a validation set (``val/loss`` in logs; lower is better)."""
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS


@METRICS.register_module()
class ValLoss(BaseMetric):
    """Consumes ``tk``'s ``ValLoop`` outputs; the mean is weighted by trained tokens."""

    default_prefix = "val"

    def process(self, data_batch, data_samples) -> None:
        self.results.extend((sample["loss_sum"], sample["tokens"]) for sample in data_samples)

    def compute_metrics(self, results: list) -> dict:
        tokens = sum(n for _, n in results)
        return {"loss": sum(s for s, _ in results) / tokens if tokens else float("nan")}
