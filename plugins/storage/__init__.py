"""covenant.plugins.storage: object storage for peers and validators.

Transports over fsspec (``file://``, ``memory://``, ``s3://`` for AWS S3 and Cloudflare R2),
the run's key layout, signed manifests, verified bounded downloads, the on-chain read-credential
commitment format and retention. ``plugin.py`` wires it into the engine; see docs/storage.md.
"""
