module kubefly.dev/runc-wrapper

go 1.26.0
