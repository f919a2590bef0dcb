"""clipcount: text-guided zero-shot object counting (CLIP-Count, Jiang et al., ACM MM 2023)."""

__version__ = "0.1.0"
