"""Distributed-training settings derived from the spec, shared by the operator and the trainer.

Pure functions, no torch: the operator renders the DeepSpeed JSON into the job's ConfigMap and
builds the torchrun command of the worker pods; the trainer builds the same settings when it runs
outside a cluster. HF Trainer fills every "auto" value from its TrainingArguments (batch sizes,
gradient accumulation and clipping, learning rate, AdamW betas/eps/weight decay, bf16/fp16).
"""

from __future__ import annotations

from typing import Any

from kubetune.spec import FineTuneJobSpec

CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/job.yaml"
DEEPSPEED_PATH = f"{CONFIG_DIR}/deepspeed.json"
MASTER_PORT = 29500

_ZERO_STAGES = {"deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}


def uses_deepspeed(spec: FineTuneJobSpec) -> bool:
    """True for the deepspeed-zero1/2/3 strategies."""
    return str(spec.resources.strategy) in _ZERO_STAGES


def processes_per_node(spec: FineTuneJobSpec) -> int:
    """One training process per GPU; one per pod when training on CPU (gpusPerNode 0, gloo)."""
    return max(1, spec.resources.gpus_per_node)


def world_size(spec: FineTuneJobSpec) -> int:
    """Total training processes."""
    return spec.resources.nodes * processes_per_node(spec)


def _precision_sections(precision: str) -> dict[str, Any]:
    fp16_extra = {
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    if precision == "bf16":
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == "fp16":
        return {"bf16": {"enabled": False}, "fp16": {"enabled": True, **fp16_extra}}
    if precision == "fp32":
        return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    # auto: the trainer resolves the precision and HF Trainer fills these from --bf16/--fp16
    return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", **fp16_extra}}


def deepspeed_config(spec: FineTuneJobSpec, *, torch_adam: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for a deepspeed-zero1/2/3 strategy (HF "auto" values where it fills them).

    `torch_adam` selects torch's AdamW instead of DeepSpeed's fused CUDA Adam; by default it is on for
    CPU training (gpusPerNode 0), where the fused kernel does not exist.
    """
    strategy = str(spec.resources.strategy)
    if strategy not in _ZERO_STAGES:
        raise ValueError(f"resources.strategy {strategy!r} is not a DeepSpeed strategy")
    stage = _ZERO_STAGES[strategy]
    on_cpu = spec.resources.gpus_per_node == 0
    if torch_adam is None:
        torch_adam = on_cpu
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": not on_cpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage in (1, 2):
        zero.update(
            {"allgather_partitions": True, "allgather_bucket_size": 200_000_000, "reduce_scatter": True}
        )
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "sub_group_size": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    optimizer_params: dict[str, Any] = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if torch_adam:
        optimizer_params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        **_precision_sections(str(spec.training.precision)),
        "steps_per_print": 1_000_000,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return config


def fsdp_options(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Keyword arguments for transformers' TrainingArguments (`fsdp`, `fsdp_config`) for strategy fsdp.

    Full sharding with transformer-block auto-wrapping; `use_orig_params` so PEFT adapters (a mix of
    frozen and trainable parameters) can be sharded; sharded state dicts for checkpoints.
    Activation checkpointing stays with TrainingArguments.gradient_checkpointing (HF refuses both).
    """
    if str(spec.resources.strategy) != "fsdp":
        raise ValueError(f"resources.strategy {spec.resources.strategy!r} is not fsdp")
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "backward_prefetch": "backward_pre",
            "forward_prefetch": False,
            "limit_all_gathers": True,
            "use_orig_params": True,
            "sync_module_states": True,
            "cpu_ram_efficient_loading": True,
            "activation_checkpointing": False,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    }


# torchrun through kubetune_trainer.launch: the same arguments, but the pod exits with the workers' code
# (3: configuration or data error, 143: preempted) instead of torchrun's 1 for any failure
LAUNCHER = ["python", "-m", "kubetune_trainer.launch"]


def launcher_args(
    spec: FineTuneJobSpec,
    *,
    master_addr: str,
    master_port: int = MASTER_PORT,
    node_rank_expr: str,
    nproc_per_node: int | None = None,
    resume: str | None = None,
    config_path: str = CONFIG_PATH,
    deepspeed_path: str = DEEPSPEED_PATH,
) -> list[str]:
    """The torchrun command line of one worker pod (see LAUNCHER).

    `node_rank_expr` is what the pod passes as --node-rank, for example "$(JOB_COMPLETION_INDEX)"
    (expanded by the kubelet from the env var the Job controller sets on Indexed Job pods).
    `resume` adds `--resume {auto,latest,never}` for the trainer.
    """
    nproc = processes_per_node(spec) if nproc_per_node is None else nproc_per_node
    args = [
        *LAUNCHER,
        "--nnodes",
        str(spec.resources.nodes),
        "--nproc-per-node",
        str(nproc),
        "--node-rank",
        node_rank_expr,
        "--master-addr",
        master_addr,
        "--master-port",
        str(master_port),
        "-m",
        "kubetune_trainer",
        "--config",
        config_path,
    ]
    if uses_deepspeed(spec):
        args += ["--deepspeed", deepspeed_path]
    if resume:
        args += ["--resume", resume]
    return args
