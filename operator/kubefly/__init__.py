"""kubefly: a Fly.io-style app platform on any Kubernetes cluster."""

GROUP = "kubefly.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
