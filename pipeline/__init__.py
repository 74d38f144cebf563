"""frankensoup: finetune CLIP many times, fuse the finetunes with manifold mixing model soup.

``pipeline.load_fused(uri)`` loads a published result (see pipeline/fused.py)."""

__all__ = ["load_fused"]


def __getattr__(name: str):
    # lazy: `import pipeline` (the CLI, config checks) should not pull in torch and open_clip
    if name == "load_fused":
        from .fused import load_fused

        return load_fused
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
