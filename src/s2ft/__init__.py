"""s2ft: Structured Sparse Fine-Tuning (S²FT, NeurIPS 2024) for Hugging Face models.

Train a few attention heads and FFN channels per block as dense delta blocks with exact
partial back-propagation; save, load, merge and unload the resulting adapters.

    from s2ft import S2FTConfig, get_s2ft_model, S2FTModel
    model = get_s2ft_model(base_model, S2FTConfig(ffn_ratio=0.03, seed=0))
"""

__version__ = "0.1.0"

from s2ft.adapter_io import AdapterError
from s2ft.config import S2FTConfig
from s2ft.model import S2FTModel, get_s2ft_model
from s2ft.structures import ARCHITECTURES, UnsupportedModelError

__all__ = [
    "ARCHITECTURES",
    "AdapterError",
    "S2FTConfig",
    "S2FTModel",
    "UnsupportedModelError",
    "__version__",
    "get_s2ft_model",
]
