"""The kind tier: real pods on real kubelets (a package, so its cluster is deleted when its tests end)."""
