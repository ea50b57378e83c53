"""Processors for the integration tests, loaded by the stage processes by dotted path
(``tests.integration.models.plugins:...``; the stages run from the checkout)."""

from __future__ import annotations

from stages.plugins import Arrays, Batch, Processed, Processor


class BatchSize(Processor):
    """postprocess: labels every row ``rows=<rows in the call>``: the batch it ran in."""

    def postprocess(self, batch: Batch, outputs: Arrays) -> Processed:
        return Processed(arrays=outputs, labels=[f"rows={len(batch)}"] * len(batch))


class RaiseOnPoison(Processor):
    """postprocess: raises when a request of the batch has the attribute ``poison``."""

    def postprocess(self, batch: Batch, outputs: Arrays) -> Processed:
        if any("poison" in request.attributes for request in batch.requests):
            raise ValueError("this request is poison")
        return Processed(arrays=outputs)
