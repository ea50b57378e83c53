"""Which processes a benchmarked pipeline runs (bench/pipelines.py): ours follows the
topology; the peers always run their three stages."""

from bench.pipelines import STAGES, PipelineSpec, pipeline_stages

FUSED = {"STREAMINFER_STAGE_TOPOLOGY": "fused"}


def test_ours_runs_the_topologys_processes() -> None:
    ours = PipelineSpec(name="ours", guarantee="exactly-once", prefix="p.")
    assert pipeline_stages(ours, {}) == STAGES == ("validate", "infer", "persist")
    assert pipeline_stages(ours, FUSED) == ("fused",)
    two = {**FUSED, "BENCH_FUSED_PROCESSES": "2"}
    assert pipeline_stages(ours, two) == ("fused", "fused-2")


def test_the_peers_ignore_our_topology() -> None:
    faust = PipelineSpec(name="faust", guarantee="exactly-once", prefix="p.")
    assert pipeline_stages(faust, FUSED) == STAGES
