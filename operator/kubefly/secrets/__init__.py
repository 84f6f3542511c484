"""Sealed secrets: values encrypted for the cluster's key, opened only by the operator."""
