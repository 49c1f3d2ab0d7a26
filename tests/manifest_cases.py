"""Every valid and invalid FineTuneJob case of the test suite, in one list for both validators.

`kubetune validate` (the pydantic models) and the API server (the generated CRD) must give the same
verdict on each, and, for a refusal, name the same field: tests/test_spec.py runs them through the
models, tests/test_operator_cluster.py through both (a real kube-apiserver).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from tests.support.manifests import job_with_secrets

NS = "ml"
DELETE = object()


def base(name: str = "case") -> dict[str, Any]:
    """A valid manifest the cases change (the cluster tests create its Secrets)."""
    return job_with_secrets(name, NS, "s3://runs/case/")


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    node: Any = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = copy.deepcopy(value)


@dataclass
class Case:
    """A change to :func:`base`; `field` is the path both validators must name (None: must be accepted)."""

    id: str
    changes: dict[str, Any]
    field: str | None = None
    # refused by kubectl itself before the API server sees it (NaN, infinity): no field path there
    client_side: bool = False

    def manifest(self, name: str = "case") -> dict[str, Any]:
        body = base(name)
        for path, value in self.changes.items():
            _set(body, path, value)
        return body


def _bad(id: str, field: str, **changes: Any) -> Case:
    return Case(id, {k.replace("__", "."): v for k, v in changes.items()}, field)


def _ok(id: str, **changes: Any) -> Case:
    return Case(id, {k.replace("__", "."): v for k, v in changes.items()})


LONG_KEY = "sk-" + "A1b2C3d4" * 40  # a secret pasted into the wrong field: never printed back whole

INVALID: list[Case] = [
    # required fields and shapes
    _bad("missing-model", "spec.model", spec__model=DELETE),
    _bad("missing-task", "spec.task", spec__task=DELETE),
    _bad("missing-datasets", "spec.datasets", spec__datasets=DELETE),
    _bad("empty-datasets", "spec.datasets", spec__datasets=[]),
    _bad("empty-model-source", "spec.model.source", spec__model__source=""),
    _bad("null-model-source", "spec.model.source", spec__model__source=None),
    _bad("model-not-a-mapping", "spec.model", spec__model="bundled://smollm2-135m-instruct"),
    _bad("unknown-field", "spec.learningRate", spec__learningRate=0.1),
    _bad("unknown-nested-field", "spec.trainng", spec__trainng={"epochs": 1}),
    _bad("lora-at-top-level", "spec.lora", spec__lora={"r": 8}),
    _bad("snake-case-field", "spec.training.max_steps", spec__training={"max_steps": 3}),
    _bad("snake-case-section", "spec.run_policy", spec__run_policy={"maxRestarts": 1}),
    _bad("unknown-field-null", "spec.training.maxStep", spec__training={"maxStep": None}),
    # enums
    _bad("bad-method", "spec.method.type", spec__method={"type": "prefix-tuning"}),
    _bad("bad-task", "spec.task.type", spec__task__type="translation"),
    _bad("bad-precision", "spec.training.precision", spec__training={"precision": "fp8"}),
    _bad("bad-scheduler", "spec.training.scheduler", spec__training={"scheduler": "step"}),
    _bad("bad-strategy", "spec.resources.strategy", spec__resources__strategy="horovod"),
    _bad("bad-pull-policy", "spec.resources.imagePullPolicy", spec__resources__imagePullPolicy="Sometimes"),
    _bad("bad-export", "spec.output.exports[0]", spec__output__exports=["pdf"]),
    _bad("bad-second-export", "spec.output.exports[1]", spec__output__exports=["adapter", "gguf"]),
    _bad("dataset-bad-format", "spec.datasets[0].format", spec__datasets=[{"source": "d", "format": "xml"}]),
    _bad(
        "dataset-bad-file-type",
        "spec.datasets[0].fileType",
        spec__datasets=[{"source": "d", "fileType": "xlsx"}],
    ),
    _bad(
        "quantization-8-bits",
        "spec.method.quantization.bits",
        spec__method={"type": "qlora", "quantization": {"bits": 8}},
    ),
    # strict types: nothing is coerced
    _bad("int-as-string", "spec.training.maxSteps", spec__training={"maxSteps": "8"}),
    _bad("int-as-bool", "spec.training.maxSteps", spec__training={"maxSteps": True}),
    _bad("int-as-fraction", "spec.method.lora.r", spec__method={"type": "lora", "lora": {"r": 1.5}}),
    _bad("float-as-string", "spec.training.learningRate", spec__training={"learningRate": "0.001"}),
    _bad("float-as-bool", "spec.datasets[0].weight", spec__datasets=[{"source": "d", "weight": True}]),
    _bad("bool-as-string", "spec.suspend", spec__suspend="yes"),
    _bad("bool-as-int", "spec.training.packing", spec__training={"packing": 1}),
    _bad("string-as-int", "spec.model.revision", spec__model__revision=1234),
    _bad(
        "batch-size-word", "spec.training.batchSizePerDevice", spec__training={"batchSizePerDevice": "four"}
    ),
    Case(
        "learning-rate-nan",
        {"spec.training": {"learningRate": float("nan")}},
        "spec.training.learningRate",
        client_side=True,
    ),
    Case(
        "weight-infinite",
        {"spec.datasets": [{"source": "d", "weight": float("inf")}]},
        "spec.datasets[0].weight",
        client_side=True,
    ),
    # bounds
    _bad("lora-rank-zero", "spec.method.lora.r", spec__method={"type": "lora", "lora": {"r": 0}}),
    _bad(
        "lora-dropout-one", "spec.method.lora.dropout", spec__method={"type": "lora", "lora": {"dropout": 1}}
    ),
    _bad("dataset-weight-zero", "spec.datasets[0].weight", spec__datasets=[{"source": "d", "weight": 0}]),
    _bad(
        "dataset-weight-negative", "spec.datasets[0].weight", spec__datasets=[{"source": "d", "weight": -1}]
    ),
    _bad("validation-fraction-one", "spec.validation.fraction", spec__validation={"fraction": 1}),
    _bad("learning-rate-zero", "spec.training.learningRate", spec__training={"learningRate": 0}),
    _bad("learning-rate-negative", "spec.training.learningRate", spec__training={"learningRate": -1}),
    _bad("learning-rate-above-one", "spec.training.learningRate", spec__training={"learningRate": 2}),
    _bad("tiny-seq-length", "spec.training.maxSeqLength", spec__training={"maxSeqLength": 4}),
    _bad("negative-seed", "spec.training.seed", spec__training={"seed": -1}),
    _bad("huge-seed", "spec.training.seed", spec__training={"seed": 2**40}),
    _bad("huge-max-steps", "spec.training.maxSteps", spec__training={"maxSteps": 2**40}),
    _bad("zero-nodes", "spec.resources.nodes", spec__resources__nodes=0),
    _bad("too-many-nodes", "spec.resources.nodes", spec__resources__nodes=5000),
    _bad("negative-gpus", "spec.resources.gpusPerNode", spec__resources__gpusPerNode=-1),
    _bad("keep-last-zero", "spec.checkpoint.keepLast", spec__checkpoint={"keepLast": 0}),
    _bad("negative-max-restarts", "spec.runPolicy.maxRestarts", spec__runPolicy={"maxRestarts": -1}),
    _bad(
        "zero-deadline", "spec.runPolicy.activeDeadlineSeconds", spec__runPolicy={"activeDeadlineSeconds": 0}
    ),
    _bad("max-new-tokens-huge", "spec.evaluation.maxNewTokens", spec__evaluation={"maxNewTokens": 100000}),
    # lengths of strings and lists
    _bad("too-many-datasets", "spec.datasets", spec__datasets=[{"source": f"d{i}"} for i in range(65)]),
    _bad("too-many-exports", "spec.output.exports", spec__output__exports=["adapter"] * 9),
    _bad("too-many-prompts", "spec.evaluation.samplePrompts", spec__evaluation={"samplePrompts": ["p"] * 65}),
    _bad("empty-prompt", "spec.evaluation.samplePrompts[0]", spec__evaluation={"samplePrompts": [""]}),
    _bad("long-source", "spec.model.source", spec__model__source="org/" + "m" * 2100),
    _bad(
        "long-text-field",
        "spec.datasets[0].textField",
        spec__datasets=[{"source": "d", "textField": "t" * 1100}],
    ),
    _bad("long-prompt", "spec.evaluation.samplePrompts[0]", spec__evaluation={"samplePrompts": ["p" * 9000]}),
    _bad("secret-in-region", "spec.storage.s3.region", spec__storage={"s3": {"region": LONG_KEY * 4}}),
    _bad(
        "secret-in-secret-name",
        "spec.output.credentialsSecretRef.name",
        spec__output__credentialsSecretRef={"name": LONG_KEY[:120]},
    ),
    _bad(
        "secret-in-node-selector",
        "spec.resources.nodeSelector",
        spec__resources__nodeSelector={"pool": "=" + LONG_KEY[:60]},
    ),
    # metadata
    _bad("name-too-long", "metadata.name", metadata__name="a" * 49),
    _bad("name-starts-with-digit", "metadata.name", metadata__name="1job"),
    _bad("name-uppercase", "metadata.name", metadata__name="Bad_Name"),
    _bad("name-ends-with-dash", "metadata.name", metadata__name="job-"),
    _bad("name-missing", "metadata.name", metadata__name=DELETE),
    _bad(
        "generate-name-too-long",
        "metadata.generateName",
        metadata__name=DELETE,
        metadata__generateName="a" * 44,
    ),
    _bad("label-bad-key", "metadata.labels", metadata__labels={"bad key": "x"}),
    _bad("label-value-too-long", "metadata.labels", metadata__labels={"team": "v" * 64}),
    _bad("label-value-not-a-string", "metadata.labels", metadata__labels={"replicas": 3}),
    _bad("annotation-bad-key", "metadata.annotations", metadata__annotations={"not/a/key": "x"}),
    _bad("annotations-too-large", "metadata.annotations", metadata__annotations={"a": "x" * 270000}),
    _bad("unknown-metadata-field", "metadata.labelz", metadata__labelz={"a": "b"}),
    _bad("unknown-top-level-field", "specs", specs={"model": {}}),
    # cross-field rules
    _bad("qlora-without-quantization", "spec.method.quantization", spec__method={"type": "qlora"}),
    _bad(
        "quantization-without-qlora",
        "spec.method.quantization",
        spec__method={"type": "lora", "quantization": {}},
    ),
    _bad("lora-with-full", "spec.method.lora", spec__method={"type": "full", "lora": {}}),
    _bad(
        "full-exports-adapter",
        "spec.output.exports",
        spec__method={"type": "full"},
        spec__output__exports=["adapter"],
    ),
    _bad("unknown-bundled-model", "spec.model.source", spec__model__source="bundled://nope"),
    _bad(
        "remote-code-unpinned",
        "spec.model.revision",
        spec__model={"source": "org/model", "trustRemoteCode": True, "revision": "main"},
    ),
    _bad(
        "validation-fraction-and-datasets",
        "spec.validation.datasets",
        spec__validation={"fraction": 0.1, "datasets": [{"source": "v"}]},
    ),
    _bad(
        "warmup-steps-and-ratio",
        "spec.training.warmupRatio",
        spec__training={"warmupSteps": 10, "warmupRatio": 0.1},
    ),
    _bad(
        "completion-with-chat-data",
        "spec.datasets",
        spec__task__type="completion",
        spec__datasets=[{"source": "d", "format": "messages"}],
    ),
    _bad(
        "completion-with-default-chat",
        "spec.datasets",
        spec__task__type="completion",
        spec__datasets=[{"source": "d", "format": "alpaca"}],
    ),
    _bad(
        "completion-with-chat-validation",
        "spec.validation.datasets",
        spec__task__type="completion",
        spec__datasets=[{"source": "d"}],
        spec__validation={"datasets": [{"source": "v", "format": "alpaca"}]},
    ),
    _bad(
        "early-stopping-without-evaluation",
        "spec.training.earlyStopping",
        spec__training={"earlyStopping": {"patience": 2}},
    ),
    _bad(
        "early-stopping-intervals-do-not-divide",
        "spec.checkpoint.everySteps",
        spec__training={"earlyStopping": {}},
        spec__evaluation={"everySteps": 10},
        spec__checkpoint={"everySteps": 15},
    ),
    _bad(
        "fp16-on-cpu",
        "spec.training.precision",
        spec__training={"precision": "fp16"},
        spec__resources__gpusPerNode=0,
    ),
    _bad("wandb-without-project", "spec.tracking.wandb.project", spec__tracking={"wandb": {}}),
    # Kubernetes-typed fields
    _bad(
        "empty-secret-name",
        "spec.output.credentialsSecretRef.name",
        spec__output__credentialsSecretRef={"name": ""},
    ),
    _bad(
        "bad-secret-name",
        "spec.output.credentialsSecretRef.name",
        spec__output__credentialsSecretRef={"name": "My_Secret"},
    ),
    _bad(
        "bad-pull-secret",
        "spec.resources.imagePullSecrets[0]",
        spec__resources__imagePullSecrets=["Has Space"],
    ),
    _bad(
        "bad-priority-class", "spec.resources.priorityClassName", spec__resources__priorityClassName="High!"
    ),
    _bad("bad-queue-name", "spec.scheduling.queueName", spec__scheduling={"queueName": "team queue"}),
    _bad(
        "bad-node-selector-value",
        "spec.resources.nodeSelector",
        spec__resources__nodeSelector={"pool": "a b"},
    ),
    _bad(
        "bad-node-selector-key",
        "spec.resources.nodeSelector",
        spec__resources__nodeSelector={"bad key!": "x"},
    ),
    _bad("cpu-not-a-quantity", "spec.resources.cpu", spec__resources__cpu="lots"),
    _bad("cpu-zero", "spec.resources.cpu", spec__resources__cpu=0),
    _bad("cpu-fraction-number", "spec.resources.cpu", spec__resources__cpu=1.5),
    _bad("cpu-bool", "spec.resources.cpu", spec__resources__cpu=True),
    _bad("memory-negative", "spec.resources.memory", spec__resources__memory="-1Gi"),
    _bad("memory-bad-suffix", "spec.resources.memory", spec__resources__memory="12GB"),
    _bad("memory-zero", "spec.resources.memory", spec__resources__memory="0"),
    _bad("shared-memory-empty", "spec.resources.sharedMemory", spec__resources__sharedMemory=""),
    _bad("shared-memory-two-dots", "spec.resources.sharedMemory", spec__resources__sharedMemory="1.5.5Gi"),
    _bad(
        "toleration-bad-operator",
        "spec.resources.tolerations[0].operator",
        spec__resources__tolerations=[{"key": "gpu", "operator": "Maybe"}],
    ),
    _bad(
        "toleration-bad-effect",
        "spec.resources.tolerations[0].effect",
        spec__resources__tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoRun"}],
    ),
    _bad(
        "toleration-exists-with-value",
        "spec.resources.tolerations[0].value",
        spec__resources__tolerations=[{"key": "gpu", "operator": "Exists", "value": "x"}],
    ),
    _bad(
        "toleration-no-key-equal",
        "spec.resources.tolerations[0].operator",
        spec__resources__tolerations=[{"operator": "Equal", "value": "x"}],
    ),
    _bad(
        "toleration-seconds-without-noexecute",
        "spec.resources.tolerations[0].effect",
        spec__resources__tolerations=[{"key": "gpu", "operator": "Exists", "tolerationSeconds": 60}],
    ),
    _bad(
        "toleration-unknown-field",
        "spec.resources.tolerations[0].tolerationSecond",
        spec__resources__tolerations=[{"key": "gpu", "operator": "Exists", "tolerationSecond": 60}],
    ),
    _bad(
        "toleration-bad-key",
        "spec.resources.tolerations[0].key",
        spec__resources__tolerations=[{"key": "bad key", "operator": "Exists"}],
    ),
    _bad(
        "toleration-negative-seconds",
        "spec.resources.tolerations[0].tolerationSeconds",
        spec__resources__tolerations=[
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -5}
        ],
    ),
    # URIs
    _bad("model-https", "spec.model.source", spec__model__source="https://example.com/model"),
    _bad("model-s3-no-bucket", "spec.model.source", spec__model__source="s3://"),
    _bad("model-s3-no-key", "spec.model.source", spec__model__source="s3://bucket"),
    _bad("model-s3-bucket-slash", "spec.model.source", spec__model__source="s3://bucket/"),
    _bad("model-gcs", "spec.model.source", spec__model__source="gs://bucket/model"),
    _bad("adapter-https", "spec.model.adapter", spec__model__adapter="https://example.com/adapter"),
    _bad("adapter-hub", "spec.model.adapter", spec__model__adapter="hf://org/adapter"),
    _bad("adapter-bundled", "spec.model.adapter", spec__model__adapter="bundled://smollm2-135m-instruct"),
    _bad("adapter-s3-no-key", "spec.model.adapter", spec__model__adapter="s3://bucket/"),
    _bad("adapter-empty", "spec.model.adapter", spec__model__adapter=""),
    _bad(
        "dataset-http", "spec.datasets[0].source", spec__datasets=[{"source": "http://example.com/d.jsonl"}]
    ),
    _bad("dataset-s3-empty-bucket", "spec.datasets[0].source", spec__datasets=[{"source": "s3:///d.jsonl"}]),
    _bad(
        "validation-dataset-s3-no-key",
        "spec.validation.datasets[0].source",
        spec__validation={"datasets": [{"source": "s3://bucket"}]},
    ),
    _bad("output-empty", "spec.output.uri", spec__output__uri=""),
    _bad("output-s3-no-bucket", "spec.output.uri", spec__output__uri="s3://"),
    _bad("output-https", "spec.output.uri", spec__output__uri="https://example.com/out"),
    _bad("output-hub", "spec.output.uri", spec__output__uri="hf://org/name"),
    _bad(
        "endpoint-without-scheme",
        "spec.storage.s3.endpointUrl",
        spec__storage={"s3": {"endpointUrl": "minio:9000"}},
    ),
    # preference tuning: settings of one objective on another, rows of one task in another
    _bad(
        "preference-losstype-on-kto",
        "spec.task.preference.lossType",
        spec__task={"type": "preference", "preference": {"objective": "kto", "lossType": "ipo"}},
    ),
    _bad(
        "preference-desirable-weight-on-dpo",
        "spec.task.preference.desirableWeight",
        spec__task={"type": "preference", "preference": {"objective": "dpo", "desirableWeight": 2}},
    ),
    _bad(
        "preference-undesirable-weight-on-orpo",
        "spec.task.preference.undesirableWeight",
        spec__task={"type": "preference", "preference": {"objective": "orpo", "undesirableWeight": 2}},
    ),
    _bad(
        "preference-settings-on-chat",
        "spec.task.preference",
        spec__task={"type": "chat", "preference": {"objective": "dpo"}},
    ),
    _bad(
        "preference-unknown-objective",
        "spec.task.preference.objective",
        spec__task={"type": "preference", "preference": {"objective": "ppo"}},
    ),
    _bad(
        "preference-unknown-loss",
        "spec.task.preference.lossType",
        spec__task={"type": "preference", "preference": {"lossType": "hinge"}},
    ),
    _bad(
        "preference-beta-zero",
        "spec.task.preference.beta",
        spec__task={"type": "preference", "preference": {"beta": 0}},
    ),
    _bad(
        "preference-rows-on-chat-task",
        "spec.datasets",
        spec__datasets=[{"source": "d.jsonl", "format": "preference"}],
    ),
    _bad(
        "unpaired-rows-on-dpo",
        "spec.datasets",
        spec__task={"type": "preference"},
        spec__datasets=[{"source": "d.jsonl", "format": "unpaired"}],
    ),
    _bad(
        "alpaca-rows-on-preference-task",
        "spec.datasets",
        spec__task={"type": "preference"},
        spec__datasets=[{"source": "d.jsonl", "format": "alpaca"}],
    ),
    _bad(
        "preference-validation-rows-on-chat-task",
        "spec.validation.datasets",
        spec__validation={"datasets": [{"source": "v.jsonl", "format": "preference"}]},
    ),
    _bad(
        "alpaca-validation-rows-on-preference-task",
        "spec.validation.datasets",
        spec__task={"type": "preference"},
        spec__validation={"datasets": [{"source": "v.jsonl", "format": "alpaca"}]},
    ),
    _bad(
        "unpaired-validation-rows-on-orpo",
        "spec.validation.datasets",
        spec__task={"type": "preference", "preference": {"objective": "orpo"}},
        spec__validation={"datasets": [{"source": "v.jsonl", "format": "unpaired"}]},
    ),
]

VALID: list[Case] = [
    _ok("base"),
    _ok("full-without-exports", spec__method={"type": "full"}),
    _ok("no-exports", spec__method={"type": "full"}, spec__output__exports=[]),
    _ok("full-with-merged", spec__method={"type": "full"}, spec__output__exports=["merged", "int8"]),
    _ok("qlora", spec__method={"type": "qlora", "quantization": {"bits": 4}}),
    _ok(
        "int-for-float",
        spec__training={"learningRate": 1, "epochs": 2, "weightDecay": 0},
        spec__datasets=[{"source": "d", "weight": 3}],
    ),
    _ok(
        "quantities",
        spec__resources__cpu="500m",
        spec__resources__memory="64Gi",
        spec__resources__sharedMemory="1.5G",
    ),
    _ok("quantity-exponent", spec__resources__memory="1e9", spec__resources__cpu="2"),
    _ok("quantity-as-number", spec__resources__cpu=16, spec__resources__memory=68719476736),
    _ok(
        "tolerations",
        spec__resources__tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "pool", "operator": "Equal", "value": "gpu"},
            {"operator": "Exists"},
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
    ),
    _ok("hub-model", spec__model={"source": "hf://HuggingFaceTB/SmolLM2-135M", "revision": "main"}),
    _ok(
        "hub-model-pinned-remote-code",
        spec__model={"source": "org/model", "trustRemoteCode": True, "revision": "a" * 40},
    ),
    _ok("s3-model", spec__model={"source": "s3://models/llama/"}),
    _ok("local-model", spec__model={"source": "/models/llama"}),
    _ok(
        "s3-adapter",
        spec__model={"source": "s3://models/llama/", "adapter": "s3://runs/sft/exports/adapter/"},
    ),
    _ok("local-adapter", spec__model={"source": "/models/llama", "adapter": "/models/sft-adapter"}),
    _ok(
        "s3-glob-and-local-datasets",
        spec__datasets=[
            {"source": "s3://data/train/*.jsonl"},
            {"source": "./data/extra.jsonl", "weight": 0.5},
        ],
    ),
    _ok("output-bucket-only", spec__output__uri="s3://runs"),
    _ok("output-local", spec__output__uri="/mnt/runs/case"),
    _ok(
        "endpoint",
        spec__storage={"s3": {"endpointUrl": "http://minio.storage:9000", "addressingStyle": "path"}},
    ),
    _ok(
        "early-stopping",
        spec__training={"earlyStopping": {"patience": 2}},
        spec__evaluation={"everySteps": 10},
        spec__checkpoint={"everySteps": 20},
    ),
    _ok(
        "early-stopping-default-checkpoints",
        spec__training={"earlyStopping": {}},
        spec__evaluation={"everySteps": 10},
    ),
    _ok(
        "checkpoint-and-evaluation-independent",
        spec__evaluation={"everySteps": 10},
        spec__checkpoint={"everySteps": 15},
    ),
    _ok("name-48", metadata__name="a" * 48),
    _ok("generate-name", metadata__name=DELETE, metadata__generateName="sft-"),
    _ok(
        "labels-and-annotations",
        metadata__labels={"app.kubernetes.io/team": "a", "tier": ""},
        metadata__annotations={"example.com/note": "any text: " + "x" * 2000},
    ),
    _ok("node-selector", spec__resources__nodeSelector={"kubernetes.io/arch": "amd64", "pool": ""}),
    _ok("queue", spec__scheduling={"queueName": "team-a"}),
    _ok("completion", spec__task__type="completion", spec__datasets=[{"source": "d.txt"}]),
    _ok("seed-zero", spec__training={"seed": 0}),
    _ok(
        "integral-float-for-int", spec__training={"seed": 7.0, "maxSteps": 100.0}, spec__resources__nodes=2.0
    ),
    # null means absent (the API server prunes nulls before defaulting): the defaults apply
    _ok(
        "nulls-are-absent",
        spec__training={"seed": None, "learningRate": None, "packing": None},
        spec__method=None,
        spec__output__exports=None,
        spec__resources__nodeSelector={"pool": None},
        spec__runPolicy=None,
        spec__evaluation={"samplePrompts": None},
    ),
    _ok("cpu-training", spec__resources__gpusPerNode=0, spec__resources__nodes=1),
    _ok("bf16-on-cpu", spec__resources__gpusPerNode=0, spec__training={"precision": "bf16"}),
    _ok("fp16-on-gpu", spec__training={"precision": "fp16"}),
    _ok("preference-dpo-default", spec__task={"type": "preference"}),
    _ok(
        "preference-dpo-ipo",
        spec__task={
            "type": "preference",
            "template": "chat-template",
            "preference": {"objective": "dpo", "lossType": "ipo", "beta": 0.5, "maxPromptLength": 256},
        },
    ),
    _ok(
        "preference-kto-unpaired",
        spec__task={
            "type": "preference",
            "preference": {"objective": "kto", "desirableWeight": 1.0, "undesirableWeight": 1.33},
        },
        spec__datasets=[
            {"source": "u.jsonl", "format": "unpaired"},
            {"source": "p.jsonl", "format": "preference"},
        ],
    ),
    _ok(
        "preference-orpo-full",
        spec__method={"type": "full"},
        spec__task={"type": "preference", "preference": {"objective": "orpo"}},
    ),
]


# Values put in place of every field of every valid case by `mutations()`: wrong types, bounds, nulls,
# lengths, near-miss strings. Both validators must agree on each result.
MUTATION_VALUES: list[Any] = [
    None,
    "",
    "x",
    "8",
    8,
    -1,
    0,
    1.5,
    -0.0,
    True,
    "yes",
    [],
    {},
    [1],
    {"a": 1},
    "a" * 1500,
    2**40,
    2**31,
    2**31 - 1,
    1e10,
    "1e3",
    "0.5",
    "500m",
    "s3://b",
    "s3://b/k",
    "hf://x/y",
    "http://x",
    "/abs/path",
    [None],
    [""],
    ["x"],
    [{"a": 1}],
    {"k": None},
    "A_b",
    "a.b/c",
]


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, path + (index,))
    return out


def mutations(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(description, manifest) for every spec field of `documents` set to every MUTATION_VALUES value
    (each field path and value once)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for document in documents:
        for path in _paths(document):
            if len(path) < 2 or path[0] != "spec":
                continue
            shape = ".".join("#" if isinstance(p, int) else str(p) for p in path)
            for value in MUTATION_VALUES:
                key = (shape, repr(value))
                if key in seen:
                    continue
                seen.add(key)
                body = copy.deepcopy(document)
                node: Any = body
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]] = copy.deepcopy(value)
                out.append((f"{shape}={value!r:.30}", body))
    return out
