"""Kubernetes: render PyTorchJob / TrainJob manifests from a recipe, and talk to a cluster."""
