"""The M2C query methods, declared in the method registry (`fti4cir.methods`) when `fti4cir.m2c` is imported.

"m2c": the stage-I query (Phi's pseudo token with visual semantic injection); "m2c+compose": the stage-II query
through the composing adapters (needs stage-II weights). Both run on the M2C model sharing the FTI4CIR model's
backbone, read the reference's visual features with its patch tokens, and use the official M2C prompts and texts.
"""

from __future__ import annotations

from ..errors import UserError
from ..methods import Method, register, rendered, runnable
from .model import PROMPTS, M2CConfig, M2CModel, M2CNetwork, fashioniq_text, m2c_query


def m2c_model_of(model) -> M2CModel:
    """The M2C model to run: `model` itself, or the M2C model an FTI4CIR model was built with (`spec.m2c_weights`)."""
    if isinstance(model, M2CModel):
        return model
    m2c_model = getattr(model, "m2c", None)
    if m2c_model is None:
        raise UserError("The M2C methods need M2C weights (--m2c-weights)")
    return m2c_model


def _config(weights) -> M2CConfig:
    if isinstance(weights, M2CModel):
        return weights.config
    return weights.config if isinstance(weights, M2CNetwork) else weights


def _has_adapters(weights) -> bool:
    """Whether an M2C model, network or weights config has stage II's composing adapters."""
    return bool(_config(weights).adapter_layers)


def _query(use_adapters: bool):
    def compose(model, references, texts, *, template=None, keep_attributes=None, keep_subject=None):
        return m2c_query(m2c_model_of(model), references, texts, prompt=template, use_adapters=use_adapters)

    return compose


def _declare(name: str, use_adapters: bool, available=None) -> Method:
    extra = {"available": available} if available is not None else {}
    return register(
        Method(
            name,
            _query(use_adapters),
            rendered(PROMPTS["default"]),
            PROMPTS["default"],
            dataset_templates={k: v for k, v in PROMPTS.items() if k != "default"},
            family="m2c",
            image_feature=True,
            patch_tokens=True,
            fashioniq_text=fashioniq_text,
            **extra,
        )
    )


M2C = _declare("m2c", False)
M2C_COMPOSE = _declare("m2c+compose", True, _has_adapters)


def available_methods(weights: M2CModel | M2CNetwork | M2CConfig) -> tuple[str, ...]:
    """The M2C methods a model, network or weights config can run: "m2c+compose" needs stage-II weights."""
    return runnable({"m2c": weights})
