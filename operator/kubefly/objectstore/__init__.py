"""The bundled object store's own keys: its TLS certificate (tls) and per-tenant S3 identities (access)."""
