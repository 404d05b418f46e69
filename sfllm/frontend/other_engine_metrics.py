"""vLLM's and SGLang's names for sfllm's metrics, beside sfllm's own on /metrics.

Dashboards, autoscalers (KEDA, the Kubernetes HPA on custom metrics) and the Gateway API Inference Extension's
endpoint picker built for those engines read these names: `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc`
(or SGLang's `sglang:num_queue_reqs` and `sglang:token_usage`) pick a replica or add one. Each name is given to the
one sfllm metric that means the same, with the served model as `model_name`, the label those engines put on every
metric; a metric sfllm keeps by priority class is summed over the classes, as theirs count every request.

Near, not equal: sfllm's time per output token is each sequence's mean, so it takes vLLM's per-request name
(`vllm:request_time_per_output_token_seconds`), not `vllm:inter_token_latency_seconds`, which counts every gap;
`request_success`, time to first token and the token-count histograms count one per sequence of `n`, as vLLM's, but
the end-to-end latency one per successful HTTP request (vLLM: per sequence, whatever its end). Bucket bounds are
sfllm's. Not served: vLLM's inter-token latency and prefill / decode time histograms, SGLang's cache hit rate
(sfllm's counts since the start, SGLang's recent batches) and generation throughput.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class OtherMetricName:
    name: str  # the family's name, as the other engine declares it (a counter's without `_total`)
    summed_label: str | None = None  # sfllm's label whose values the other engine counts as one
    documentation: str | None = None  # where sfllm's would be wrong (it names the summed label)
    renamed_labels: tuple[tuple[str, str], ...] = ()  # sfllm's label -> the other engine's


_BY_PRIORITY = "priority"
_RUNNING = "Requests in the running batch"
_WAITING = "Requests waiting to be scheduled"

# sfllm's family name -> the names other engines give it
OTHER_METRIC_NAMES: dict[str, tuple[OtherMetricName, ...]] = {
    "sfllm_num_requests_running": (OtherMetricName("vllm:num_requests_running", _BY_PRIORITY, _RUNNING),
                                   OtherMetricName("sglang:num_running_reqs", _BY_PRIORITY, _RUNNING)),
    "sfllm_num_requests_waiting": (OtherMetricName("vllm:num_requests_waiting", _BY_PRIORITY, _WAITING),
                                   OtherMetricName("sglang:num_queue_reqs", _BY_PRIORITY, _WAITING)),
    "sfllm_kv_cache_usage_ratio": (OtherMetricName("vllm:kv_cache_usage_perc"),
                                   OtherMetricName("sglang:token_usage")),
    "sfllm_prefix_cache_queries": (OtherMetricName("vllm:prefix_cache_queries"),),
    "sfllm_prefix_cache_hits": (OtherMetricName("vllm:prefix_cache_hits"),),
    "sfllm_preemptions": (OtherMetricName("vllm:num_preemptions"),),
    "sfllm_prompt_tokens": (OtherMetricName("vllm:prompt_tokens"), OtherMetricName("sglang:prompt_tokens")),
    "sfllm_generation_tokens": (OtherMetricName("vllm:generation_tokens"),
                                OtherMetricName("sglang:generation_tokens")),
    "sfllm_requests_finished": (OtherMetricName("vllm:request_success",
                                                renamed_labels=(("reason", "finished_reason"),)),),
    "sfllm_request_queue_time_seconds": (OtherMetricName("vllm:request_queue_time_seconds"),),
    "sfllm_time_to_first_token_seconds": (OtherMetricName("vllm:time_to_first_token_seconds"),
                                          OtherMetricName("sglang:time_to_first_token_seconds")),
    "sfllm_time_per_output_token_seconds": (OtherMetricName("vllm:request_time_per_output_token_seconds"),),
    "sfllm_e2e_request_latency_seconds": (OtherMetricName("vllm:e2e_request_latency_seconds"),
                                          OtherMetricName("sglang:e2e_request_latency_seconds")),
    "sfllm_request_prompt_tokens": (OtherMetricName("vllm:request_prompt_tokens"),),
    "sfllm_request_generation_tokens": (OtherMetricName("vllm:request_generation_tokens"),),
}


def other_engine_families(families: Iterable[Metric], model_name: str) -> Iterator[Metric]:
    """Each of `families` that other engines name, under each of their names."""
    for family in families:
        for other in OTHER_METRIC_NAMES.get(family.name, ()):
            yield _renamed(family, other, model_name)


def _renamed(family: Metric, other: OtherMetricName, model_name: str) -> Metric:
    renamed = Metric(other.name, other.documentation or family.documentation, family.type, family.unit)
    labels_of = dict(other.renamed_labels)
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in family.samples:
        labels = {labels_of.get(key, key): value for key, value in sample.labels.items()
                  if key != other.summed_label}
        labels["model_name"] = model_name
        name = other.name + sample.name[len(family.name):]  # keeps _total, _bucket, _sum, _count
        if other.summed_label is None:
            renamed.samples.append(Sample(name, labels, sample.value, sample.timestamp, sample.exemplar))
        else:
            key = (name, tuple(sorted(labels.items())))
            sums[key] = sums.get(key, 0.0) + sample.value
    renamed.samples.extend(Sample(name, dict(labels), value) for (name, labels), value in sums.items())
    return renamed
