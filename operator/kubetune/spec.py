"""The FineTuneJob spec: the single source of truth.

These typed models are what `kubetune run` reads, what the operator reads from the custom
resource, what the CRD's OpenAPI schema (and so `kubectl explain`) is generated from, and what
the trainer is configured by. Field names are camelCase in YAML (Kubernetes style) and
snake_case in Python. Unknown fields are rejected everywhere except `metadata`.

This module imports nothing heavy (no torch), so the operator image can use it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ["ftj"]

# Exit codes of the trainer. The operator decides what to do with a failed pod from these.
EXIT_OK = 0
EXIT_RETRYABLE = 1  # any unexpected crash: retried, counted against runPolicy.maxRestarts
EXIT_CONFIG_ERROR = 3  # bad spec or bad data: never retried
EXIT_PREEMPTED = 143  # SIGTERM received, checkpoint saved: restarted without counting

BUNDLED_PREFIX = "bundled://"
BUNDLED_MODELS = {"smollm2-135m-instruct"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# org/name or hf://org/name on the Hugging Face hub (what the trainer treats as a hub id when no such path exists)
HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")

# ----- bounds: the one place they are set (pydantic enforces them; the CRD is generated from them) -----

# metadata.name: the Job is <name>-<attempt>, its pods' hostnames <name>-<attempt>-<index>, and the
# headless Service <name> must be a DNS-1035 label (63 characters, starting with a letter).
MAX_NAME_LENGTH = 48
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
DEFAULT_MAX_LENGTH = 1024  # any string without a tighter bound
URI_MAX_LENGTH = 2048  # model, dataset and output locations, endpoints
PROMPT_MAX_LENGTH = 8192  # evaluation.samplePrompts[]
DEFAULT_MAX_ITEMS = 256  # any list without a tighter bound
MAX_DATASETS = 64
MAX_INT = 2**31 - 1  # every integer (the API server's int64 is wider; nothing sensible is larger)
MAX_SEED = 2**32 - 1  # numpy's seed range
# a Kubernetes object name (Secret, PriorityClass, ...): a DNS-1123 subdomain
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# a label value (also Kueue queue names)
LABEL_VALUE = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# a label or taint key: an optional DNS subdomain prefix and a name of at most 63 characters
QUALIFIED_NAME = (
    "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# a resource quantity as Kubernetes writes it (no sign: a negative size makes no sense here)
QUANTITY = "^([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"


@dataclass(frozen=True)
class Rule:
    """A check kept in one place for both validators: `check` for pydantic, `cel` (on `self`) for the CRD.

    The message says what is valid; both validators prefix it with the field path."""

    check: Callable[[Any], bool]
    cel: str
    message: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any) -> Any:
            if not self.check(value):
                raise ValueError(self.message)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        out.setdefault("x-kubernetes-validations", []).append(
            {"rule": self.cel, "message": self.message, "reason": "FieldValueInvalid"}
        )
        return out


@dataclass(frozen=True)
class ModelRule:
    """A cross-field check of one model, declared once (a ClassVar of the model, beside its validator).

    `cel` (on the model's object, `self`) goes into the CRD as an x-kubernetes-validations rule with
    fieldPath `.<field>`; the model's pydantic validator raises `error()` where the same condition
    fails. Both say `message` for `field` (tests/test_crd.py checks each against a bad manifest)."""

    field: str
    cel: str
    message: str
    reason: str = "FieldValueInvalid"

    def error(self, detail: str = "", *, at: str | None = None) -> ValueError:
        """The pydantic validator's error: `<field>: <message><detail>` (`at`: a more precise field)."""
        return ValueError(f"{at or self.field}: {self.message}{detail}")

    def schema(self) -> dict[str, Any]:
        """The x-kubernetes-validations entry."""
        return {
            "rule": self.cel,
            "message": self.message,
            "fieldPath": f".{self.field}",
            "reason": self.reason,
        }


def model_rules(model: type) -> list[ModelRule]:
    """The ModelRules a model class declares, in declaration order."""
    return [value for value in vars(model).values() if isinstance(value, ModelRule)]


def _add_model_rules(schema: dict[str, Any], model: type) -> None:
    rules = [rule.schema() for rule in model_rules(model)]
    if rules:
        schema.setdefault("x-kubernetes-validations", []).extend(rules)


def _match(pattern: str) -> Callable[[str], bool]:
    regex = re.compile(pattern)
    return lambda value: bool(regex.search(value))


def _location(value: str, *, key: bool) -> bool:
    if re.match(r"^https?://", value, re.IGNORECASE):
        return False
    if re.match(r"^[A-Za-z][-A-Za-z0-9+.]*://", value) and not re.match(r"^(s3|hf|bundled)://", value):
        return False
    if value.startswith("s3://"):
        return bool(re.match(r"^s3://[^/]+/[^/].*$" if key else r"^s3://[^/]+(/.*)?$", value))
    return True


SourceRule = Rule(
    lambda v: _location(v, key=True),
    "(!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://') || self.matches('^(s3|hf|bundled)://')) && "
    "(!self.startsWith('s3://') || self.matches('^s3://[^/]+/[^/].*$'))",
    "use s3://bucket/key (a bucket and a key), a local path, a Hugging Face hub id (org/name) or "
    "bundled://<name>; http(s) URLs and other schemes are not read",
)
DatasetSourceRule = Rule(
    lambda v: _location(v, key=True) and not v.startswith(("hf://", "bundled://")),
    "(!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://') || self.startsWith('s3://')) && "
    "(!self.startsWith('s3://') || self.matches('^s3://[^/]+/[^/].*$'))",
    "use s3://bucket/key (a bucket and a key; globs allowed in the key) or a local file, directory or glob; "
    "http(s) URLs and other schemes are not read",
)
OutputRule = Rule(
    lambda v: _location(v, key=False) and not v.startswith(("hf://", "bundled://")),
    "(!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://') || self.startsWith('s3://')) && "
    "(!self.startsWith('s3://') || self.matches('^s3://[^/]+(/.*)?$'))",
    "use s3://bucket/prefix/ (a bucket is required) or a local directory; other schemes are not written",
)
AdapterRule = Rule(  # where it may be read from is where a dataset may: s3://bucket/key or a local path
    DatasetSourceRule.check,
    DatasetSourceRule.cel,
    "use s3://bucket/prefix/ (a bucket and a key) or a local directory holding a PEFT adapter "
    "(adapter_config.json); hub ids, http(s) URLs and other schemes are not read",
)
EndpointRule = Rule(
    _match("^https?://[^/]+"),
    "self.matches('^https?://[^/]+')",
    "use http://host[:port] or https://host[:port]",
)
QuantityRule = Rule(
    lambda v: bool(re.match(QUANTITY, v)) and bool(re.search("[1-9]", re.sub("[eE].*$", "", v))),
    f"type(self) == int ? self > 0 : (self.matches('{QUANTITY}') && "
    "self.replace('e', 'E').split('E')[0].matches('[1-9]'))",
    "a positive Kubernetes quantity, for example 16, 500m, 64Gi or 1.5G",
)


def _whole_units(value: Any) -> Any:
    """A quantity written as a whole number (cpu: 16), as Kubernetes takes it, becomes its string form."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _IntOrString:
    """Marks a field int-or-string in its JSON schema (x-kubernetes-int-or-string), as core/v1 quantities."""

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        out.pop("type", None)
        out["x-kubernetes-int-or-string"] = True
        return out


NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=DEFAULT_MAX_LENGTH)]
Location = Annotated[str, StringConstraints(min_length=1, max_length=URI_MAX_LENGTH)]


def _pattern_rule(pattern: str, message: str) -> Rule:
    """A regex check as a Rule rather than a schema `pattern`: the API server then names what is valid and
    does not print the offending value back (it may be a secret pasted into the wrong field)."""
    return Rule(_match(pattern), f"self.matches('{pattern}')", message)


K8sName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253),
    _pattern_rule(DNS_SUBDOMAIN, "must be a Kubernetes object name (lowercase letters, digits, '-' and '.')"),
]
LabelValue = Annotated[
    str,
    StringConstraints(max_length=63),
    _pattern_rule(
        LABEL_VALUE,
        "must be a label value (letters, digits, '-', '_' and '.', starting and ending with a letter "
        "or digit)",
    ),
]
LabelKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=316),
    _pattern_rule(
        QUALIFIED_NAME, "must be a qualified name such as nvidia.com/gpu (an optional DNS prefix and a name)"
    ),
]
Quantity = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    QuantityRule,
    BeforeValidator(_whole_units),
    _IntOrString(),
]


class SpecModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


class JobModel(SpecModel):
    """Base of the FineTuneJob spec models: strict types, as the API server has them.

    No "8" for 8, no true for 1, no "yes" for true, no NaN or infinity."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, json_schema_extra=_add_model_rules)

    @model_validator(mode="before")
    @classmethod
    def _as_the_api_server_reads_it(cls, data: Any) -> Any:
        """A known field set to null is absent (the API server prunes such nulls before defaulting, also
        in string maps); an integer field takes an integral number such as 2.0 (JSON does not tell them
        apart). Unknown fields stay, to be refused even when null."""
        if not isinstance(data, dict):
            return data
        fields = _field_kinds(cls)
        out = {}
        for key, value in data.items():
            kind = fields.get(key)
            if kind is not None and value is None:
                continue
            if kind == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif kind == "map" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if v is not None}
            out[key] = value
        return out


def _field_kinds(model: type[BaseModel]) -> dict[str, str]:
    """{camelCase name: int | map | other} of a model's fields."""
    kinds = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        union = get_origin(annotation) in (Union, UnionType)
        args = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
        origin = get_origin(args[0]) if len(args) == 1 else None
        kind = "int" if args == [int] else "map" if origin is dict else "other"
        kinds[info.alias or name] = kind
    return kinds


# Annotated[SomeEnum, _LAX]: an enum field that takes its string values (strict mode would want the
# Python enum member). An Annotated alias, not a function call, so that type checkers read the field.
_LAX = Strict(False)


class SecretKeyRef(JobModel):
    """A reference to a Kubernetes Secret; values are passed to pods as environment only."""

    name: K8sName = Field(description="Name of a Secret in the job's namespace.")


class MethodType(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"


class LoraSpec(JobModel):
    """Low-rank adapter settings (PEFT LoraConfig)."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, le=1e6, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout probability on the adapter input.")
    target_modules: list[NonEmpty] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=DEFAULT_MAX_ITEMS,
        description="Module names to adapt (for example q_proj, v_proj), or the single entry 'all-linear' "
        "for every linear layer except the output head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[NonEmpty] = Field(
        default_factory=list,
        max_length=DEFAULT_MAX_ITEMS,
        description="Extra modules trained in full and saved with the adapter (for example lm_head).",
    )


class QuantizationSpec(JobModel):
    """4-bit quantization of the frozen base model for QLoRA (bitsandbytes)."""

    bits: Literal[4] = Field(4, description="Bits per weight of the frozen base model. Only 4 is supported.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (normal float) or fp4.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the matrix multiplications and of a merged export."
    )


class MethodSpec(JobModel):
    """How the weights are trained."""

    type: Annotated[MethodType, _LAX] = Field(
        MethodType.lora,
        description="full: every weight; lora: adapters on a frozen "
        "base; qlora: adapters on a 4-bit quantized frozen base.",
    )
    lora: LoraSpec | None = Field(
        None, description="Adapter settings; defaults apply for lora and qlora when omitted."
    )
    quantization: QuantizationSpec | None = Field(
        None, description="Required for qlora, not allowed otherwise."
    )

    QLORA_NEEDS_QUANTIZATION: ClassVar[ModelRule] = ModelRule(
        "quantization",
        "!has(self.type) || self.type != 'qlora' || has(self.quantization)",
        "required when type is qlora (for example {bits: 4, type: nf4})",
        "FieldValueRequired",
    )
    QUANTIZATION_ONLY_QLORA: ClassVar[ModelRule] = ModelRule(
        "quantization",
        "!has(self.quantization) || (has(self.type) && self.type == 'qlora')",
        "only valid with type qlora",
        "FieldValueForbidden",
    )
    NO_LORA_WITH_FULL: ClassVar[ModelRule] = ModelRule(
        "lora",
        "!has(self.lora) || !has(self.type) || self.type != 'full'",
        "only valid with type lora or qlora, not full",
        "FieldValueForbidden",
    )

    @model_validator(mode="after")
    def _check_method(self) -> MethodSpec:
        if self.type == MethodType.qlora.value and self.quantization is None:
            raise self.QLORA_NEEDS_QUANTIZATION.error()
        if self.type != MethodType.qlora.value and self.quantization is not None:
            raise self.QUANTIZATION_ONLY_QLORA.error(f", not {self.type}")
        if self.type == MethodType.full.value and self.lora is not None:
            raise self.NO_LORA_WITH_FULL.error()
        if self.type != MethodType.full.value and self.lora is None:
            self.lora = LoraSpec.model_validate({})
        return self


class ModelSpec(JobModel):
    """The base model to fine-tune."""

    source: Annotated[Location, SourceRule] = Field(
        description="Where the base model is: a local directory in Hugging Face format, s3://bucket/prefix/, "
        "a Hugging Face hub id (org/name, or hf://org/name), or bundled://smollm2-135m-instruct.",
    )
    revision: NonEmpty | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    adapter: Annotated[Location, AdapterRule] | None = Field(
        None,
        description="A PEFT (LoRA) adapter to apply to source before training: the adapter export of an "
        "earlier job (<output>/exports/adapter), a local directory or s3://bucket/prefix/. It is merged into the "
        "base weights first (merged once per node and cached, keyed by the base and the adapter's content), so "
        "training starts from the adapted model and, for preference tasks, the reference model is the adapted "
        "model: lora trains a new adapter on the merged weights, qlora quantizes the merged weights, full trains "
        "them all. The adapter must have been trained on this source (same architecture and shapes). Read with "
        "credentialsSecretRef, like source.",
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret with HF_TOKEN (hub) or AWS keys (S3) for reading the model (source and adapter).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the hub repository to run. A hub "
        "model then needs revision pinned to a 40-hex commit (a branch can move).",
    )

    KNOWN_BUNDLED_MODEL: ClassVar[ModelRule] = ModelRule(
        "source",
        f"!self.source.startsWith('{BUNDLED_PREFIX}') || "
        + " || ".join(f"self.source == '{BUNDLED_PREFIX}{m}'" for m in sorted(BUNDLED_MODELS)),
        f"unknown bundled model; bundled models: {', '.join(BUNDLED_PREFIX + m for m in sorted(BUNDLED_MODELS))}",
    )
    REMOTE_CODE_PINNED: ClassVar[ModelRule] = ModelRule(
        "revision",
        "!has(self.trustRemoteCode) || !self.trustRemoteCode || "
        f"!self.source.matches('{HUB_ID.pattern}') || "
        f"(has(self.revision) && self.revision.matches('{COMMIT_SHA.pattern}'))",
        "trustRemoteCode runs the repository's code, so pin the revision to a full 40-hex commit (not a "
        "branch or tag, which can move)",
    )

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.source.startswith(BUNDLED_PREFIX):
            name = self.source[len(BUNDLED_PREFIX) :]
            if name not in BUNDLED_MODELS:
                raise self.KNOWN_BUNDLED_MODEL.error(f" (not {name[:40]!r})")
        if (
            self.trust_remote_code
            and is_hub_source(self.source)
            and not (self.revision and COMMIT_SHA.match(self.revision))
        ):
            raise self.REMOTE_CODE_PINNED.error()
        return self


def is_hub_source(source: str) -> bool:
    """A Hugging Face hub model (hf://org/name or org/name), as opposed to s3://, bundled:// or a path."""
    return bool(HUB_ID.match(source))


class TaskType(str, Enum):
    instruction = "instruction"
    chat = "chat"
    completion = "completion"
    preference = "preference"


class PreferenceObjective(str, Enum):
    dpo = "dpo"
    kto = "kto"
    orpo = "orpo"


class PreferenceSpec(JobModel):
    """Preference tuning (task.type preference), trained with TRL's DPO, KTO or ORPO trainer."""

    objective: Annotated[PreferenceObjective, _LAX] = Field(
        PreferenceObjective.dpo,
        description="dpo: Direct Preference Optimization on chosen/rejected pairs; kto: "
        "Kahneman-Tversky Optimization on desirable/undesirable completions (paired rows are unpaired); orpo: "
        "odds-ratio preference optimization, reference-free (no reference model in memory).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Strength of the preference term: for dpo and kto the "
        "deviation allowed from the reference model (higher stays closer; for lossType ipo it is "
        "the regularization tau), for orpo the weight of the odds-ratio loss (lambda).",
    )
    loss_type: Literal["sigmoid", "ipo"] | None = Field(
        None,
        description="dpo only: sigmoid (the DPO paper's "
        "loss, the default) or ipo (identity preference "
        "optimization).",
    )
    desirable_weight: float | None = Field(
        None, gt=0, le=1e6, description="kto only: weight of desirable examples' losses (default 1.0)."
    )
    undesirable_weight: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="kto only: weight of undesirable "
        "examples' losses (default 1.0); balance it with desirableWeight "
        "when the two counts differ.",
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Keep at most this many prompt "
        "tokens (the end of the prompt is kept); completions are then cut to "
        "training.maxSeqLength. Truncations are counted in the run summary. "
        "Default: half of training.maxSeqLength.",
    )

    LOSS_TYPE_ONLY_DPO: ClassVar[ModelRule] = ModelRule(
        "lossType",
        "!has(self.lossType) || !has(self.objective) || self.objective == 'dpo'",
        "only valid with objective dpo",
        "FieldValueForbidden",
    )
    DESIRABLE_WEIGHT_ONLY_KTO: ClassVar[ModelRule] = ModelRule(
        "desirableWeight",
        "!has(self.desirableWeight) || (has(self.objective) && self.objective == 'kto')",
        "only valid with objective kto",
        "FieldValueForbidden",
    )
    UNDESIRABLE_WEIGHT_ONLY_KTO: ClassVar[ModelRule] = ModelRule(
        "undesirableWeight",
        "!has(self.undesirableWeight) || (has(self.objective) && self.objective == 'kto')",
        "only valid with objective kto",
        "FieldValueForbidden",
    )

    @model_validator(mode="after")
    def _check_objective(self) -> PreferenceSpec:
        if self.loss_type is not None and self.objective != PreferenceObjective.dpo.value:
            raise self.LOSS_TYPE_ONLY_DPO.error(f", not {self.objective}")
        for rule, value in (
            (self.DESIRABLE_WEIGHT_ONLY_KTO, self.desirable_weight),
            (self.UNDESIRABLE_WEIGHT_ONLY_KTO, self.undesirable_weight),
        ):
            if value is not None and self.objective != PreferenceObjective.kto.value:
                raise rule.error(f", not {self.objective}")
        return self


class TaskSpec(JobModel):
    """What the model learns to do, and how examples become tokens."""

    type: Annotated[TaskType, _LAX] = Field(
        description="instruction: alpaca-style instruction/input/output rows; chat: a "
        "messages list rendered by the chat template; completion: raw text for continued "
        "pretraining, cut into fixed-length blocks."
    )
    template: Literal["alpaca", "chat-template", "plain"] = Field(
        "alpaca",
        description="Prompt template for instruction rows: alpaca (the Stanford Alpaca prompt), chat-template "
        "(the row becomes a user/assistant exchange rendered by the tokenizer's chat template) or plain "
        "(instruction and input joined by newlines). Chat rows always use the chat template.",
    )
    train_on_prompt: bool = Field(
        False,
        description="Also compute the loss on prompt tokens. By default only response tokens are learned.",
    )
    preference: PreferenceSpec | None = Field(
        None, description="Objective and its settings; only with type preference (defaults to dpo there)."
    )

    PREFERENCE_ONLY_WITH_TYPE: ClassVar[ModelRule] = ModelRule(
        "preference",
        "!has(self.preference) || self.type == 'preference'",
        "only valid with type preference",
        "FieldValueForbidden",
    )

    @model_validator(mode="after")
    def _check_preference(self) -> TaskSpec:
        if self.type == TaskType.preference.value and self.preference is None:
            self.preference = PreferenceSpec()
        if self.type != TaskType.preference.value and self.preference is not None:
            raise self.PREFERENCE_ONLY_WITH_TYPE.error(f", not {self.type}")
        return self


class FileType(str, Enum):
    auto = "auto"
    jsonl = "jsonl"
    json = "json"
    parquet = "parquet"
    csv = "csv"
    txt = "txt"


class DatasetFormat(str, Enum):
    alpaca = "alpaca"
    messages = "messages"
    text = "text"
    preference = "preference"
    unpaired = "unpaired"


class DatasetSpec(JobModel):
    """One dataset: files, their row format and their weight in the mixture."""

    source: Annotated[Location, DatasetSourceRule] = Field(
        description="A file, a directory or a glob, local or s3://bucket/key (globs allowed in the key).",
    )
    file_type: Annotated[FileType, _LAX] = Field(
        FileType.auto, description="File format; auto picks it from the extension."
    )
    format: Annotated[DatasetFormat, _LAX] | None = Field(
        None,
        description="Row format: alpaca (instruction, input, output), messages (a list of {role, content}), "
        "text (a text column, or whole lines of a .txt file), preference (prompt, chosen, rejected: text or "
        "{role, content} lists) or unpaired (prompt, completion, label: true when desirable; kto only). "
        "Defaults from task.type.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="Relative share of this dataset in the training mixture, "
        "counted in examples (not tokens).",
    )
    text_field: NonEmpty = Field("text", description="Column holding the text for the text format.")
    messages_field: NonEmpty = Field("messages", description="Column holding the messages list.")
    max_examples: int | None = Field(
        None, ge=1, le=MAX_INT, description="Use at most this many rows (after cleaning)."
    )


class ValidationSpec(JobModel):
    """Held-out data for evaluation: a fraction of the training data, or separate files."""

    fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of each training dataset held out. Default 0.05 when no datasets are given.",
    )
    datasets: list[DatasetSpec] | None = Field(
        None, min_length=1, max_length=MAX_DATASETS, description="Separate validation files."
    )
    max_examples: int | None = Field(
        None, ge=1, le=MAX_INT, description="Evaluate on at most this many examples."
    )

    FRACTION_OR_DATASETS: ClassVar[ModelRule] = ModelRule(
        "datasets",
        "!(has(self.fraction) && has(self.datasets))",
        "give either validation.fraction or validation.datasets, not both",
        "FieldValueForbidden",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSpec:
        if self.fraction is not None and self.datasets is not None:
            raise self.FRACTION_OR_DATASETS.error()
        if self.fraction is None and self.datasets is None:
            self.fraction = 0.05
        return self


class CleaningSpec(JobModel):
    """Row cleaning applied to every dataset before tokenization; counts are reported."""

    strip: bool = Field(True, description="Strip leading and trailing whitespace from every text field.")
    drop_empty: bool = Field(True, description="Drop rows whose response (or text) is empty.")
    drop_duplicates: bool = Field(True, description="Drop exact duplicate rows.")
    min_chars: int = Field(
        0, ge=0, le=MAX_INT, description="Drop rows shorter than this many characters in total."
    )
    max_chars: int | None = Field(
        None, ge=1, le=MAX_INT, description="Drop rows longer than this many characters in total."
    )
    skip_invalid_rows: bool = Field(
        False, description="Skip and count malformed rows instead of failing with their file:line."
    )


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"
    cosine_with_min_lr = "cosine_with_min_lr"


class EarlyStoppingSpec(JobModel):
    """Stop when the evaluation metric stops improving; the best checkpoint is kept."""

    patience: int = Field(3, ge=1, le=MAX_INT, description="Evaluations without improvement before stopping.")
    metric: Literal["eval_loss", "eval_perplexity"] = Field(
        "eval_loss", description="Metric watched (lower is better)."
    )
    min_delta: float = Field(
        0.0, ge=0, le=1e6, description="Smallest decrease that counts as an improvement."
    )


class TrainingSpec(JobModel):
    """Optimization hyperparameters."""

    epochs: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Passes over the training mixture. Default 1 when maxSteps is not set.",
    )
    max_steps: int | None = Field(
        None, ge=1, le=MAX_INT, description="Optimizer steps; overrides epochs when set."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Annotated[Scheduler, _LAX] = Field(
        Scheduler.linear, description="Learning-rate schedule after warmup."
    )
    warmup_steps: int | None = Field(
        None, ge=0, le=MAX_INT, description="Linear warmup steps (overrides warmupRatio)."
    )
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    weight_decay: float = Field(0.0, ge=0, le=1e6, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        1.0, ge=0, le=1e6, description="Gradient clipping norm (0 disables clipping)."
    )
    batch_size_per_device: int = Field(
        4, ge=1, le=MAX_INT, description="Sequences per device per micro-batch."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=MAX_INT, description="Micro-batches per optimizer step."
    )
    max_seq_length: int = Field(
        1024, ge=8, le=MAX_INT, description="Longest sequence in tokens; longer examples are truncated."
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each sequence (instruction and chat "
        "tasks); completion tasks are always cut into full blocks.",
    )
    precision: Annotated[Precision, _LAX] = Field(
        Precision.auto, description="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations to save memory. Default: on for GPUs, off on CPU."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for data order, initialization and dropout.")
    logging_steps: int = Field(10, ge=1, le=MAX_INT, description="Log metrics every N optimizer steps.")
    early_stopping: EarlyStoppingSpec | None = Field(None, description="Stop early on an evaluation plateau.")

    WARMUP_STEPS_OR_RATIO: ClassVar[ModelRule] = ModelRule(
        "warmupRatio",
        "!(has(self.warmupSteps) && has(self.warmupRatio))",
        "give warmupSteps or warmupRatio, not both",
        "FieldValueForbidden",
    )

    @model_validator(mode="after")
    def _check_training(self) -> TrainingSpec:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise self.WARMUP_STEPS_OR_RATIO.error()
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class CheckpointSpec(JobModel):
    """Checkpoints: complete only once their manifest is written."""

    every_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Save a checkpoint every N optimizer "
        "steps and at the last step. Unset: no checkpoints, so a restarted run "
        "starts over (the exports are written either way).",
    )
    keep_last: int = Field(
        2, ge=1, le=MAX_INT, description="Keep this many newest complete checkpoints (plus the best)."
    )
    background: bool = Field(
        True,
        description="Hash, manifest and upload checkpoints in a background thread "
        "while training goes on (only writing the files blocks training).",
    )


class EvaluationSpec(JobModel):
    """Held-out evaluation and sample generations."""

    every_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Evaluate every N optimizer steps (always before and after training).",
    )
    perplexity: bool = Field(True, description="Report held-out perplexity.")
    sample_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=PROMPT_MAX_LENGTH)]] = (
        Field(
            default_factory=list,
            max_length=64,
            description="Prompts to generate from before and "
            "after training; defaults to a few held-out prompts.",
        )
    )
    num_sample_prompts: int = Field(
        3, ge=0, le=1024, description="Held-out prompts used when samplePrompts is empty."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated per sample prompt.")


class ExportKind(str, Enum):
    adapter = "adapter"
    merged = "merged"
    int8 = "int8"
    onnx = "onnx"


class S3Spec(JobModel):
    """S3-compatible endpoint settings (AWS S3, MinIO, Ceph RGW, SeaweedFS)."""

    endpoint_url: Annotated[Location, EndpointRule] | None = Field(
        None, description="Endpoint URL, for example http://minio.storage:9000."
    )
    region: NonEmpty | None = Field(None, description="Region name.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket addressing style; path for most self-hosted servers."
    )
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: Location | None = Field(
        None, description="Path of a CA bundle file to verify the server with."
    )


class OutputSpec(JobModel):
    """Where checkpoints, exports and the run summary go."""

    uri: Annotated[Location, OutputRule] | None = Field(
        None,
        description="A local directory or s3://bucket/prefix/. Required in a cluster; "
        "kubetune run defaults to ./runs/<name>.",
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3."
    )
    exports: list[Annotated[ExportKind, _LAX]] | None = Field(
        None,
        max_length=8,
        description="Artifacts to export: adapter (PEFT), merged "
        "(plain transformers), int8, onnx. Default: adapter for lora and "
        "qlora, merged for full.",
    )


class StorageSpec(JobModel):
    """Object-storage settings shared by the model, the datasets and the output."""

    s3: S3Spec = Field(default_factory=S3Spec, description="S3 endpoint settings.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Default Secret with AWS keys for every s3:// location."
    )


class WandbSpec(JobModel):
    """Weights & Biases logging."""

    project: NonEmpty = Field(description="Weights & Biases project.")
    entity: NonEmpty | None = Field(None, description="Team or user.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes runs to the output only."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(None, description="Secret with WANDB_API_KEY.")


class MlflowSpec(JobModel):
    """MLflow logging."""

    tracking_uri: Location = Field(description="MLflow tracking URI (http(s)://... or file:...).")
    experiment: NonEmpty = Field("kubetune", description="Experiment name.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD."
    )


class TrackingSpec(JobModel):
    """Experiment tracking."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to the output.")
    wandb: WandbSpec | None = Field(None, description="Log to Weights & Biases.")
    mlflow: MlflowSpec | None = Field(None, description="Log to MLflow.")


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed_zero1 = "deepspeed-zero1"
    deepspeed_zero2 = "deepspeed-zero2"
    deepspeed_zero3 = "deepspeed-zero3"


class Toleration(JobModel):
    """A core/v1 Toleration, validated as Kubernetes does. Reads like the dict it renders to (camelCase keys)."""

    key: LabelKey | None = Field(
        None, description="Taint key (a qualified name); empty with operator Exists tolerates every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (the default).")
    value: LabelValue | None = Field(None, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None,
        description="Taint effect to match: NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        le=MAX_INT,
        description="With effect NoExecute: how long the pod stays bound after the taint appears.",
    )

    NO_VALUE_WITH_EXISTS: ClassVar[ModelRule] = ModelRule(
        "value",
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "must be empty when operator is Exists",
    )
    EXISTS_WITHOUT_KEY: ClassVar[ModelRule] = ModelRule(
        "operator",
        "has(self.key) || (has(self.operator) && self.operator == 'Exists')",
        "must be Exists when key is empty (a toleration of every taint)",
    )
    SECONDS_ONLY_NO_EXECUTE: ClassVar[ModelRule] = ModelRule(
        "effect",
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "must be NoExecute when tolerationSeconds is set",
    )

    @model_validator(mode="after")
    def _check_toleration(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise self.NO_VALUE_WITH_EXISTS.error()
        if self.key is None and self.operator != "Exists":
            raise self.EXISTS_WITHOUT_KEY.error()
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise self.SECONDS_ONLY_NO_EXECUTE.error()
        return self

    def _items(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

    def keys(self) -> Iterator[str]:
        """The set fields' camelCase names (so that dict(toleration) is the core/v1 object)."""
        return iter(self._items())

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Like dict.get, with camelCase keys."""
        return self._items().get(key, default)


class ResourcesSpec(JobModel):
    """Pods, GPUs and placement of the training workers."""

    nodes: int = Field(1, ge=1, le=1024, description="Worker pods (one per node).")
    gpus_per_node: int = Field(
        1, ge=0, le=64, description="GPUs (and training processes) per pod; 0 trains on CPU."
    )
    strategy: Annotated[Strategy, _LAX] = Field(
        Strategy.ddp, description="Distributed strategy: ddp, fsdp or DeepSpeed ZeRO 1/2/3."
    )
    image: NonEmpty | None = Field(None, description="Trainer image; the platform default when omitted.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy."
    )
    image_pull_secrets: list[K8sName] = Field(
        default_factory=list, max_length=DEFAULT_MAX_ITEMS, description="Names of image pull Secrets."
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, for example '16'.")
    memory: Quantity | None = Field(
        None, description="Memory request and limit per pod, for example '128Gi'."
    )
    shared_memory: Quantity = Field("8Gi", description="Size of /dev/shm (NCCL and data loaders need it).")
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=DEFAULT_MAX_ITEMS,
        description="Pod tolerations (core/v1 Toleration).",
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1 Affinity).")
    priority_class_name: K8sName | None = Field(None, description="PriorityClass of the pods.")


class GangSpec(JobModel):
    """Gang scheduling: the worker pods are placed all together or not at all."""

    provider: Literal["coscheduling", "volcano"] = Field(
        description="Gang scheduler: coscheduling (scheduler-plugins PodGroup) or volcano (Volcano PodGroup); "
        "the platform must enable it (it also names the scheduler)."
    )
    min_member: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Pods that must be placeable together (default: all of them, resources.nodes).",
    )
    schedule_timeout_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="coscheduling only: how long "
        "the group may wait to be placed before its pods are retried.",
    )


class SchedulingSpec(JobModel):
    """Queueing."""

    queue_name: LabelValue | None = Field(
        None, description="Kueue LocalQueue; the Job is created suspended and admitted by Kueue."
    )
    priority_class_name: K8sName | None = Field(None, description="Kueue WorkloadPriorityClass.")
    gang: GangSpec | None = Field(
        None, description="Gang scheduling of the worker pods without Kueue (a PodGroup per attempt)."
    )


class RunPolicySpec(JobModel):
    """Restarts and lifetimes."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts of the worker group after retryable failures (preemptions do not count).",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=MAX_INT, description="Fail the job after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=MAX_INT, description="Delete the FineTuneJob this long after it finished."
    )


PREFERENCE_FORMATS = (DatasetFormat.preference.value, DatasetFormat.unpaired.value)
_PREFERENCE_ROWS = "has(d.format) && (d.format == 'preference' || d.format == 'unpaired')"
_OTHER_ROWS = "has(d.format) && d.format != 'preference' && d.format != 'unpaired'"
_KTO = "has(self.task.preference) && has(self.task.preference.objective) && self.task.preference.objective == 'kto'"


def _present(field: str) -> str:
    return "true" if field == "datasets" else "has(self.validation) && has(self.validation.datasets)"


def _preference_rows_need_task(field: str) -> ModelRule:
    return ModelRule(
        field,
        f"self.task.type == 'preference' || !({_present(field)}) || "
        f"!self.{field}.exists(d, {_PREFERENCE_ROWS})",
        "preference and unpaired rows need task.type preference",
    )


def _preference_task_rows(field: str) -> ModelRule:
    return ModelRule(
        field,
        f"self.task.type != 'preference' || !({_present(field)}) || !self.{field}.exists(d, {_OTHER_ROWS})",
        "a preference task takes preference (prompt, chosen, rejected) or unpaired (prompt, "
        "completion, label) rows",
    )


def _unpaired_needs_kto(field: str) -> ModelRule:
    return ModelRule(
        field,
        f"!({_present(field)}) || "
        f"!self.{field}.exists(d, has(d.format) && d.format == 'unpaired') || ({_KTO})",
        "unpaired rows (prompt, completion, label) need task.preference.objective kto",
    )


class FineTuneJobSpec(JobModel):
    """What to fine-tune, on what, how, and where the results go."""

    model: ModelSpec = Field(description="The base model.")
    method: MethodSpec = Field(
        default_factory=MethodSpec, description="Training method: full, lora or qlora."
    )
    task: TaskSpec = Field(description="The task and prompt format.")
    datasets: list[DatasetSpec] = Field(
        min_length=1, max_length=MAX_DATASETS, description="Training datasets, mixed by weight."
    )
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec, description="Held-out evaluation data."
    )
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="Row cleaning.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation and samples.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Outputs and exports.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object storage settings.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and placement.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Queueing.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Restarts and lifetimes.")
    suspend: bool = Field(False, description="Remove the workers but keep checkpoints; false resumes.")

    # (the CRD adds transition rules of its own: kubetune.crd.IMMUTABLE_FIELDS, SUSPENDED_ONLY_FIELDS)
    COMPLETION_TEXT_DATASETS: ClassVar[ModelRule] = ModelRule(
        "datasets",
        "self.task.type != 'completion' || !self.datasets.exists(d, has(d.format) && d.format != 'text')",
        "a completion task takes text datasets only",
    )
    COMPLETION_TEXT_VALIDATION: ClassVar[ModelRule] = ModelRule(
        "validation.datasets",
        "self.task.type != 'completion' || !has(self.validation) || "
        "!has(self.validation.datasets) || !self.validation.datasets.exists(d, has(d.format) && d.format != 'text')",
        "a completion task takes text datasets only",
    )
    PREFERENCE_ROWS_NEED_TASK: ClassVar[ModelRule] = _preference_rows_need_task("datasets")
    PREFERENCE_ROWS_NEED_TASK_VALIDATION: ClassVar[ModelRule] = _preference_rows_need_task(
        "validation.datasets"
    )
    PREFERENCE_TASK_ROWS: ClassVar[ModelRule] = _preference_task_rows("datasets")
    PREFERENCE_TASK_ROWS_VALIDATION: ClassVar[ModelRule] = _preference_task_rows("validation.datasets")
    UNPAIRED_NEEDS_KTO: ClassVar[ModelRule] = _unpaired_needs_kto("datasets")
    UNPAIRED_NEEDS_KTO_VALIDATION: ClassVar[ModelRule] = _unpaired_needs_kto("validation.datasets")
    NO_ADAPTER_WITH_FULL: ClassVar[ModelRule] = ModelRule(
        "output.exports",
        "!has(self.method) || !has(self.method.type) || self.method.type != 'full' || "
        "!has(self.output) || !has(self.output.exports) || !('adapter' in self.output.exports)",
        "'adapter' needs method lora or qlora; full fine-tuning exports 'merged' (the full model, the default), "
        "'int8' and/or 'onnx'",
    )
    NO_FP16_ON_CPU: ClassVar[ModelRule] = ModelRule(
        "training.precision",
        "!has(self.training) || !has(self.training.precision) || "
        "self.training.precision != 'fp16' || !has(self.resources) || !has(self.resources.gpusPerNode) || "
        "self.resources.gpusPerNode != 0",
        "fp16 needs a CUDA GPU and resources.gpusPerNode is 0; use auto, fp32 or bf16",
    )
    EARLY_STOPPING_NEEDS_EVALUATION: ClassVar[ModelRule] = ModelRule(
        "training.earlyStopping",
        "!has(self.training) || !has(self.training.earlyStopping) || "
        "(has(self.evaluation) && has(self.evaluation.everySteps))",
        "needs evaluation.everySteps (the plateau is measured at each evaluation)",
        "FieldValueRequired",
    )
    CHECKPOINTS_AT_EVALUATIONS: ClassVar[ModelRule] = ModelRule(
        "checkpoint.everySteps",
        "!has(self.training) || !has(self.training.earlyStopping) || !has(self.evaluation) "
        "|| !has(self.evaluation.everySteps) || !has(self.checkpoint) || !has(self.checkpoint.everySteps) || "
        "self.checkpoint.everySteps % self.evaluation.everySteps == 0",
        "with training.earlyStopping it must be a multiple of evaluation.everySteps, so that the best evaluation "
        "has a checkpoint",
    )

    @model_validator(mode="after")
    def _check_spec(self) -> FineTuneJobSpec:
        task = self.task.type
        for rule, datasets in (
            (self.COMPLETION_TEXT_DATASETS, self.datasets),
            (self.COMPLETION_TEXT_VALIDATION, self.validation.datasets or []),
        ):
            for index, dataset in enumerate(datasets):
                fmt = dataset.format or default_format(task)
                if task == TaskType.completion.value and fmt != DatasetFormat.text.value:
                    raise rule.error(f", not {fmt}", at=f"{rule.field}[{index}].format")
                _check_preference_format(self, rule.field, index, fmt)
        early, evaluate = self.training.early_stopping, self.evaluation.every_steps
        if early is not None and evaluate is None:
            raise self.EARLY_STOPPING_NEEDS_EVALUATION.error()
        if self.training.precision == Precision.fp16.value and self.resources.gpus_per_node == 0:
            raise self.NO_FP16_ON_CPU.error()
        save = self.checkpoint.every_steps
        if early is not None and evaluate is not None and save is not None and save % evaluate:
            raise self.CHECKPOINTS_AT_EVALUATIONS.error()
        if self.output.exports is None:
            default = ExportKind.merged if self.method.type == MethodType.full.value else ExportKind.adapter
            self.output.exports = [default.value]  # type: ignore[list-item]  # use_enum_values: values are stored as str
        if self.method.type == MethodType.full.value:
            bad = [e for e in self.output.exports if e == ExportKind.adapter.value]
            if bad:
                raise self.NO_ADAPTER_WITH_FULL.error()
        return self


def default_format(task: str) -> str:
    """Row format a dataset has when its spec does not say."""
    return {
        TaskType.instruction.value: DatasetFormat.alpaca.value,
        TaskType.chat.value: DatasetFormat.messages.value,
        TaskType.completion.value: DatasetFormat.text.value,
        TaskType.preference.value: DatasetFormat.preference.value,
    }[task]


def _check_preference_format(spec: FineTuneJobSpec, field: str, index: int, fmt: str) -> None:
    """Preference tasks read preference rows (unpaired ones for kto only); other tasks never do."""
    task, at = spec.task, f"{field}[{index}].format"
    validation = field != "datasets"
    if task.type != TaskType.preference.value:
        if fmt in PREFERENCE_FORMATS:
            rule = spec.PREFERENCE_ROWS_NEED_TASK_VALIDATION if validation else spec.PREFERENCE_ROWS_NEED_TASK
            raise rule.error(f", not {task.type}", at=at)
        return
    if fmt not in PREFERENCE_FORMATS:
        rule = spec.PREFERENCE_TASK_ROWS_VALIDATION if validation else spec.PREFERENCE_TASK_ROWS
        raise rule.error(f", not {fmt}", at=at)
    objective = task.preference.objective if task.preference else PreferenceObjective.dpo.value
    if fmt == DatasetFormat.unpaired.value and objective != PreferenceObjective.kto.value:
        rule = spec.UNPAIRED_NEEDS_KTO_VALIDATION if validation else spec.UNPAIRED_NEEDS_KTO
        raise rule.error(f"; {objective} learns from chosen/rejected pairs", at=at)


MAX_ANNOTATIONS_BYTES = 256 * 1024  # keys and values together, as the API server counts them
GENERATED_SUFFIX = 5  # characters the API server appends to metadata.generateName
GENERATE_NAME_PATTERN = "^[a-z][-a-z0-9]*$"
_SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
)


class ObjectMeta(BaseModel):
    """Kubernetes object metadata; a name (or a generateName) is required. Labels and annotations are
    checked as the API server checks them; unknown fields are refused as it refuses them."""

    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True)
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    generate_name: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_LENGTH - GENERATED_SUFFIX, pattern=GENERATE_NAME_PATTERN
    )
    namespace: str | None = Field(None, min_length=1, max_length=63, pattern=DNS_LABEL.pattern)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)
    # written by the API server; accepted so that `kubectl get -o yaml` output validates
    uid: Any = None
    resource_version: Any = None
    generation: Any = None
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: Any = None
    owner_references: Any = None
    finalizers: Any = None
    managed_fields: Any = None
    self_link: Any = None

    @model_validator(mode="after")
    def _named(self) -> ObjectMeta:
        if (
            sum(len(k.encode()) + len(v.encode()) for k, v in self.annotations.items())
            > MAX_ANNOTATIONS_BYTES
        ):
            raise ValueError(
                f"annotations: at most {MAX_ANNOTATIONS_BYTES // 1024} KiB in total (the API server's limit)"
            )
        if self.name is None:
            if self.generate_name is None:
                raise ValueError("name: required (or generateName, a prefix the API server completes)")
            alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the API server's
            self.name = self.generate_name + "".join(random.choice(alphabet) for _ in range(GENERATED_SUFFIX))
        return self


class FineTuneJob(JobModel):
    """A FineTuneJob manifest (as applied with kubectl or run with `kubetune run`)."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: Any = Field(None, exclude=True, description="Written by the operator; ignored here.")


# ----- status (written by the operator; its schema goes into the CRD) -----


class Phase(str, Enum):
    """status.phase of a FineTuneJob (docs/operator.md, "Phases and conditions")."""

    pending = "Pending"
    initializing = "Initializing"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


# phases a job does not leave (as the strings the status holds)
TERMINAL_PHASES = (Phase.succeeded.value, Phase.failed.value)


class Condition(SpecModel):
    """A Kubernetes-style condition (written by the operator)."""

    type: str = Field(description="Condition type, for example Running or Complete.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One-word CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="Spec generation this condition was computed for."
    )


class ProgressStatus(SpecModel):
    """Training progress (written by the trainer)."""

    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    eval_loss: float | None = Field(
        None,
        description="Latest held-out loss (preference tasks: of the objective, for example the DPO loss).",
    )
    tokens_per_second: float | None = Field(None, description="Training throughput in non-padding tokens/s.")
    trained_tokens: int | None = Field(None, description="Non-padding tokens trained so far.")
    eta_seconds: int | None = Field(None, description="Estimated seconds to finish training.")
    percent: int | None = Field(None, description="step / totalSteps in percent.")
    updated_at: str | None = Field(None, description="When the trainer reported these figures.")


class CheckpointStatus(SpecModel):
    """The latest complete checkpoint (written by the trainer)."""

    step: int = Field(description="Step of the latest complete checkpoint.")
    uri: str = Field(description="Where it is.")
    time: str | None = Field(None, description="When it completed.")


class ArtifactStatus(SpecModel):
    """One exported artifact (written by the trainer)."""

    kind: str = Field(description="adapter, merged, int8, onnx, summary, ...")
    uri: str = Field(description="Where the artifact is.")
    sha256: str = Field(description="Digest of the artifact (of its manifest for directories).")
    size_bytes: int = Field(description="Size in bytes.")


class MetricsStatus(SpecModel):
    """Evaluation results (written by the trainer)."""

    baseline_perplexity: float | None = Field(
        None, description="Held-out perplexity before training (preference tasks: of the chosen completions)."
    )
    final_perplexity: float | None = Field(None, description="Held-out perplexity after training.")
    baseline_eval_loss: float | None = Field(
        None, description="Held-out loss before training (preference tasks: of the chosen completions)."
    )
    final_eval_loss: float | None = Field(None, description="Held-out loss after training.")
    baseline_objective_loss: float | None = Field(
        None,
        description="Preference tasks: held-out loss of the objective (DPO, KTO or ORPO) before training.",
    )
    final_objective_loss: float | None = Field(
        None, description="Preference tasks: held-out loss of the objective after training."
    )
    baseline_preference_accuracy: float | None = Field(
        None,
        description="Preference tasks: share of held-out "
        "pairs whose chosen completion the model finds likelier "
        "(per token) than the rejected one, before training.",
    )
    final_preference_accuracy: float | None = Field(
        None, description="Preference tasks: the same after training."
    )
    final_reward_accuracy: float | None = Field(
        None,
        description="Preference tasks: share of held-out pairs whose "
        "implicit reward (beta * log-ratio to the model before training) "
        "is higher for the chosen completion, after training.",
    )
    final_reward_margin: float | None = Field(
        None, description="Preference tasks: mean held-out reward of chosen minus rejected after training."
    )


class FineTuneJobStatus(SpecModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="ignore")
    phase: Phase | None = Field(
        None, description="Pending, Initializing, Running, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    progress: ProgressStatus | None = Field(None, description="Training progress as reported by the trainer.")
    checkpoint: CheckpointStatus | None = Field(None, description="Latest complete checkpoint.")
    artifacts: list[ArtifactStatus] = Field(
        default_factory=list, description="Exported artifacts with digests."
    )
    metrics: MetricsStatus | None = Field(None, description="Evaluation results.")
    restarts: int = Field(0, description="Worker-group restarts counted against runPolicy.maxRestarts.")
    preemptions: int = Field(0, description="Restarts after preemption (not counted).")
    attempt: int = Field(
        0,
        description="Current worker-group attempt (the Job is <name>-<attempt>); every restart, "
        "preemption or resume starts a new one.",
    )
    start_time: str | None = Field(
        None,
        description="When the workers first started (reset when a suspended job "
        "resumes); runPolicy.activeDeadlineSeconds counts from here.",
    )
    completion_time: str | None = Field(None, description="When the job finished.")
    observed_generation: int | None = Field(None, description="Latest spec generation acted on.")
    message: str | None = Field(None, description="Latest human-readable state.")
