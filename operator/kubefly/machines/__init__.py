"""Pure Machine logic: the pod a machine runs as, and its state machine."""
