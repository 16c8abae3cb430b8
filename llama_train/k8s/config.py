"""The recipe's `k8s` section (defaults for `llama-train k8s render`; CLI flags override).

No heavy imports here: llama_train.config imports this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class K8sConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob", description="`pytorchjob` (kubeflow.org/v1) or `trainjob` (trainer.kubeflow.org/v1alpha1)."
    )
    name: str | None = Field(
        None,
        description="Job name (DNS-1035 label). Default: `llama-train-<last part of output_dir>`; "
        "the ConfigMap is `<name>-recipe`.",
    )
    image: str | None = Field(None, description="Trainer container image (required to render).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the trainer image (`Never` for images loaded into kind)."
    )
    namespace: str = Field("llama-train", description="Namespace of the job (DNS-1123 label).")
    nodes: int = Field(1, ge=1, description="Number of pods (nodes): 1 Master + nodes-1 Workers.")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per pod; 0 = CPU (gloo).")
    nproc_per_node: int | None = Field(
        None,
        ge=1,
        description="Training processes per pod. Default: gpus_per_node, or 1 on CPU. With GPUs it "
        "must equal gpus_per_node.",
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of the GPUs.")
    gpu_product: str | None = Field(
        None,
        description="Node selector value for `nvidia.com/gpu.product` (GPU feature discovery label), "
        "e.g. NVIDIA-H100-80GB-HBM3.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node selector labels for the training pods."
    )
    cpu: str = Field("2", description="CPU request per pod (Kubernetes quantity).")
    memory: str = Field("8Gi", description="Memory request and limit per pod (Kubernetes quantity).")
    shm_size: str = Field(
        "2Gi", description="Size of the memory-backed /dev/shm (data loader workers and NCCL need it)."
    )
    queue: str | None = Field(
        None, description="Kueue LocalQueue name (label `kueue.x-k8s.io/queue-name`); unset = no Kueue."
    )
    priority_class: str | None = Field(None, description="PriorityClass of the training pods.")
    service_account: str = Field("llama-train", description="ServiceAccount of the training pods.")
    pvc: str = Field(
        "llama-train-data",
        description="PersistentVolumeClaim for caches, checkpoints and outputs (must outlive pods so "
        "resume works; ReadWriteMany when nodes > 1).",
    )
    mount_path: str = Field("/mnt/llama-train", description="Where the PVC is mounted in the pods.")
    create_pvc: bool = Field(
        False, description="Also render the PVC (else it must exist, e.g. from the kustomize base)."
    )
    pvc_size: str = Field("100Gi", description="Requested size of the rendered PVC.")
    storage_class: str | None = Field(None, description="StorageClass of the rendered PVC; unset = default.")
    mlflow_uri: str | None = Field(
        None,
        description="MLFLOW_TRACKING_URI of the pods. Default: tracking.uri when it is http(s), else "
        "http://mlflow:5000 (the Service in k8s/base). A recipe tracking.uri still wins in the trainer.",
    )
    mlflow_experiment: str | None = Field(
        None, description="MLFLOW_EXPERIMENT_NAME of the pods. Default: tracking.experiment or `llama-train`."
    )
    hf_token_secret: str | None = Field(
        None, description="Secret holding the Hugging Face token (read via secretKeyRef, never inlined)."
    )
    hf_token_key: str = Field("HF_TOKEN", description="Key of the token inside hf_token_secret.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables (plain values; not PET_*/RANK/WORLD_SIZE/MASTER_*).",
    )
    backoff_limit: int = Field(
        3, ge=0, description="Retries of retryable failures (exit code >= 128, e.g. preemption 143)."
    )
    ttl_seconds_after_finished: int | None = Field(
        7 * 24 * 3600, ge=0, description="Delete the finished job after this many seconds; null = keep."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it runs longer than this (seconds)."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the job ends (`Running` frees GPUs, keeps logs of failed pods)."
    )
    termination_grace_period_seconds: int = Field(
        120, ge=1, description="Seconds between SIGTERM and SIGKILL: time to save a checkpoint on preemption."
    )
    min_nodes: int | None = Field(
        None, ge=1, description="Elastic training: lower bound of nodes (sets elasticPolicy; PyTorchJob only)."
    )
    max_nodes: int | None = Field(
        None, ge=1, description="Elastic training: upper bound of nodes (sets elasticPolicy; PyTorchJob only)."
    )
    max_restarts: int = Field(
        3, ge=0, description="Elastic training: torchrun restarts of the worker group (PET_MAX_RESTARTS)."
    )
    preprocess: bool = Field(
        True, description="Run `llama-train preprocess` before training (init container / TrainJob prefix)."
    )
    exit_code_launcher: bool = Field(
        True,
        description="Start torchrun through `python -m llama_train.k8s.launch`, which is torchrun but "
        "exits with the failing rank's exit code; plain torchrun exits 1 on any failure, which "
        "restartPolicy ExitCode never retries.",
    )
    run_as_user: int = Field(1000, ge=1, description="Non-root UID of the pods (the image's user).")
    runtime: str = Field(
        "torch-distributed", description="TrainJob: name of the ClusterTrainingRuntime (runtimeRef.name)."
    )
