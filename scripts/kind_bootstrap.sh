#!/usr/bin/env bash
# Bootstrap a local kind cluster with the Kubeflow training operator (PyTorchJob, kubeflow.org/v1)
# and run the quickstart recipe on it: 2 CPU pods, DDP over gloo, MLflow in the cluster, then the
# llama-train server on the trained adapter.
#
#   scripts/kind_bootstrap.sh            # create, build, load, train, serve
#   CLUSTER=demo TIMEOUT=7200s scripts/kind_bootstrap.sh
#
# Needs: docker, kind, kubectl on PATH. Run from anywhere; paths are relative to the repository.
set -euo pipefail

CLUSTER="${CLUSTER:-llama-train}"
NAMESPACE="llama-train"
JOB="llama-train-quickstart"
OPERATOR_REF="${OPERATOR_REF:-v1.9.4}"   # kubeflow/trainer release with the v1 training operator
TRAINER_IMAGE="llama-train-trainer:dev"
SERVER_IMAGE="llama-train-server:dev"
TIMEOUT="${TIMEOUT:-3600s}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '\n==> %s\n' "$*"; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not on PATH" >&2; exit 1; }
done

log "kind cluster ${CLUSTER}"
if ! kind get clusters | grep -qx "${CLUSTER}"; then
  kind create cluster --name "${CLUSTER}" --wait 120s
fi
kubectl config use-context "kind-${CLUSTER}"

log "Kubeflow training operator ${OPERATOR_REF}"
kubectl apply --server-side --force-conflicts \
  -k "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=${OPERATOR_REF}"
kubectl -n kubeflow rollout status deployment/training-operator --timeout=300s
kubectl wait --for=condition=Established crd/pytorchjobs.kubeflow.org --timeout=120s

log "images (CPU torch) -> kind"
# one Dockerfile, one shared base stage (CPU torch by default): the second target reuses its layers
docker build -f "${REPO}/k8s/docker/Dockerfile" --target trainer -t "${TRAINER_IMAGE}" "${REPO}"
docker build -f "${REPO}/k8s/docker/Dockerfile" --target server -t "${SERVER_IMAGE}" "${REPO}"
kind load docker-image --name "${CLUSTER}" "${TRAINER_IMAGE}" "${SERVER_IMAGE}"

log "namespace, MLflow, storage, recipe, PyTorchJob, server (k8s/overlays/local)"
kubectl create namespace "${NAMESPACE}" --dry-run=client -o yaml | kubectl apply -f -
if ! kubectl -n "${NAMESPACE}" get secret llama-train-api-key >/dev/null 2>&1; then
  kubectl -n "${NAMESPACE}" create secret generic llama-train-api-key \
    --from-literal=api-key="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
fi
# A finished job of the same name blocks a new one; the PVC (checkpoints) is kept.
kubectl -n "${NAMESPACE}" delete pytorchjob "${JOB}" --ignore-not-found
kubectl apply -k "${REPO}/k8s/overlays/local"
kubectl -n "${NAMESPACE}" rollout status deployment/mlflow --timeout=300s

log "training (kubectl -n ${NAMESPACE} logs -f ${JOB}-master-0 -c pytorch)"
kubectl -n "${NAMESPACE}" wait --for=condition=Running "pytorchjob/${JOB}" --timeout=600s || true
if ! kubectl -n "${NAMESPACE}" wait --for=condition=Succeeded "pytorchjob/${JOB}" --timeout="${TIMEOUT}"; then
  kubectl -n "${NAMESPACE}" get pytorchjob "${JOB}" -o yaml | tail -n 40
  kubectl -n "${NAMESPACE}" logs "${JOB}-master-0" -c pytorch --tail=50 || true
  echo "error: ${JOB} did not succeed" >&2
  exit 1
fi
kubectl -n "${NAMESPACE}" logs "${JOB}-master-0" -c pytorch --tail=20

log "server on the trained adapter"
# The server pod waited (crash-looping) until the adapter existed; restart it now.
kubectl -n "${NAMESPACE}" rollout restart deployment/llama-train-server
kubectl -n "${NAMESPACE}" rollout status deployment/llama-train-server --timeout=600s

cat <<MSG

Done. Try it:
  kubectl -n ${NAMESPACE} port-forward svc/llama-train-server 8000:8000 &
  KEY=\$(kubectl -n ${NAMESPACE} get secret llama-train-api-key -o jsonpath='{.data.api-key}' | base64 -d)
  curl -s localhost:8000/v1/models -H "Authorization: Bearer \$KEY"
  kubectl -n ${NAMESPACE} port-forward svc/mlflow 5000:5000     # MLflow UI
Delete everything: kind delete cluster --name ${CLUSTER}
MSG
