"""What a Volume becomes: a local PersistentVolume pinned to a host and the claim bound to it."""
