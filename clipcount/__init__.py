"""clipcount: text-guided zero-shot object counting (CLIP-Count, Jiang et al., ACM MM 2023).

    from clipcount import Counter
    counter = Counter.from_pretrained("demo")
    result = counter.count("photo.jpg", "apples")
"""

__version__ = "0.1.0"

__all__ = ["Counter", "CountResult", "__version__"]


def __getattr__(name: str):
    # `import clipcount` stays light (no torch) until the API is actually used
    if name in ("Counter", "CountResult"):
        from clipcount import api

        return getattr(api, name)
    raise AttributeError(f"module 'clipcount' has no attribute {name!r}")
