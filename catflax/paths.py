"""Local paths and object-store URLs (gs://BUCKET/DIR, or any scheme etils.epath reads)."""


def is_remote(path: object) -> bool:
    """Whether `path` names an object store (a URL with a scheme) rather than a local file."""
    return "://" in str(path)
