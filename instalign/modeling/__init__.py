"""InstAlign's model (paper §3): backbone, text encoder, pixel decoder, POT blocks, heads.

Importing this package has no side effects (no weights are read, nothing is written);
``build_model`` is where weights are loaded.
"""

from instalign.modeling.backbone import BackboneLoadError
from instalign.modeling.builders import build_model, instalign_paper, instalign_tiny
from instalign.modeling.model import InstAlign
from instalign.modeling.outputs import BlockPrediction, InstAlignOutput
from instalign.modeling.text_encoder import TextEncoderLoadError, load_tokenizer

__all__ = [
    "BackboneLoadError",
    "BlockPrediction",
    "InstAlign",
    "InstAlignOutput",
    "TextEncoderLoadError",
    "build_model",
    "instalign_paper",
    "instalign_tiny",
    "load_tokenizer",
]
