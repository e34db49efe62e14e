"""The model room: loading models and the only code that knows TransformerLens hook names."""

from .adapter import ModelAdapter
from .loading import load_model, load_zoo_model
from .sites import EMBED, FwdHook, Site, WriterLayout, capture, node_site

__all__ = ["EMBED", "FwdHook", "ModelAdapter", "Site", "WriterLayout", "capture", "load_model", "load_zoo_model",
           "node_site"]
