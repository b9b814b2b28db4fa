"""M2C, "From Mapping to Composing" (arXiv 2504.17990): a second zero-shot CIR method on the shared backbone.

Stage I maps an image to one pseudo-word token with visual semantic injection (`model`), stage II adds composing
adapters to the text tower; `m2c_compose` is its query path (methods "m2c" and "m2c+compose", declared in the method
registry by `methods`). This package holds the method only: the model (`model`, `methods`) and the official
checkpoints' converter (`convert`). See docs/m2c.md.
"""

from .methods import (  # importing declares the M2C query methods
    available_methods,
    m2c_model_of,
)
from .model import (
    MAPPING_PROMPT,
    PROMPTS,
    M2CConfig,
    M2CModel,
    M2CNetwork,
    fashioniq_text,
    is_m2c_weights,
    load_m2c_weights,
    m2c_compose,
    m2c_query,
    read_m2c_config,
    save_m2c_weights,
)

__all__ = [
    "MAPPING_PROMPT",
    "PROMPTS",
    "M2CConfig",
    "M2CModel",
    "M2CNetwork",
    "available_methods",
    "fashioniq_text",
    "is_m2c_weights",
    "load_m2c_weights",
    "m2c_compose",
    "m2c_model_of",
    "m2c_query",
    "read_m2c_config",
    "save_m2c_weights",
]
