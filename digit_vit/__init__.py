"""digit_vit: read a line of handwritten digits with a ViT encoder and a Transformer decoder."""

__version__ = "0.1.0"
