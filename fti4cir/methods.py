"""The query methods, each declared once: its name, prompt template, what it reads, its query function and the
sentence the app shows for it.

`fti4cir.compose` runs a method by name, `fti4cir.explain.query_sentence` renders its sentence, the app service and
the evaluation ask it what a query needs (pseudo tokens, visual features, the M2C model) and which model runs it.
The core methods (FTI4CIR and its baselines) are declared here; other packages declare theirs with `register` when
they are imported (`fti4cir.m2c` declares "m2c" and "m2c+compose", so the core never imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import prompts
from .queries import image_query, image_text_query, pseudo_token_query, text_query

# (text, subject shown as "[word]" or the neutral word, attribute words) -> the query's text side for display
Sentence = Callable[[str, str, Sequence[str]], str]


def _always(model: Any) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """One query method.

    compose(model, references, texts, *, template, keep_attributes, keep_subject) -> `queries.Composed`; `model` is
    the model of `family` ("fti4cir": the CIRModel; "m2c": the M2C model on the same backbone). The token switches
    act on FTI4CIR's pseudo tokens; other methods ignore them.
    """

    name: str
    compose: Callable[..., Any]
    sentence: Sentence
    template: str | None = None  # the default prompt template; None: no template (plain text, or no text)
    dataset_templates: Mapping[str, str] = field(default_factory=dict)  # evaluation: per benchmark, else `template`
    custom_template: bool = False  # a user's template (evaluate --prompt) replaces `template`
    family: str = "fti4cir"  # the model that runs it (`fti4cir.spec.METHOD_FAMILIES`)
    pseudo_tokens: bool = False  # reads FTI4CIR's pseudo tokens (cached per gallery / inversion weights)
    image_feature: bool = False  # reads the reference's global image feature (pseudo tokens carry it)
    patch_tokens: bool = False  # reads the reference's patch tokens: a visual pass (cached pseudo tokens lack them)
    text: bool = True  # the modification text is part of the query
    # FashionIQ's two captions -> the text(s) the method encodes (a tuple: variants, their features averaged)
    fashioniq_text: Callable[[str, str], Any] = prompts.fashioniq_texts
    available: Callable[[Any], bool] = _always  # whether a model of `family` (or its weights' config) can run it

    def template_for(self, dataset: str | None = None, custom: str | None = None) -> str | None:
        """The template this method encodes for a benchmark (`custom`: the user's, where the method takes one)."""
        if self.template is None:
            return None
        if self.custom_template and custom is not None:
            return custom
        return self.dataset_templates.get(dataset, self.template)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Declare a method (its name must be new; re-registering the same declaration is a no-op)."""
    known = _REGISTRY.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"query method {method.name!r} is already declared")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The declaration of `name`; ValueError for a method nobody declared."""
    method = _REGISTRY.get(name)
    if method is None:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return method


def names(family: str | None = None) -> tuple[str, ...]:
    """Declared method names in declaration order (the core's first), of one family or all."""
    return tuple(m.name for m in _REGISTRY.values() if family is None or m.family == family)


def runnable(models: Mapping[str, Any]) -> tuple[str, ...]:
    """The methods the given models can run: {family: model, or the config of its weights, or None}."""
    return tuple(
        m.name for m in _REGISTRY.values() if models.get(m.family) is not None and m.available(models[m.family])
    )


def rendered(template: str) -> Sentence:
    """The display sentence of a template method: the template with the pseudo tokens' words."""
    return lambda text, subject, attributes: prompts.render(template, subject, attributes, text)


def _image_text_sentence(text: str, subject: str, attributes: Sequence[str]) -> str:
    return f"(image feature) + {text}" if text else "(image feature) + (empty text)"


# ---- the core methods: FTI4CIR and its baselines -----------------------------------------------------------------
FTI4CIR = register(
    Method(
        "fti4cir",
        partial(pseudo_token_query, attributes=True),
        rendered(prompts.DEFAULT),
        prompts.DEFAULT,
        dataset_templates={name: t for name, t in prompts.PROMPTS.items() if name in ("cirr", "circo", "fashioniq")},
        custom_template=True,
        pseudo_tokens=True,
    )
)
SUBJECT_ONLY = register(
    Method(
        "subject-only",
        partial(pseudo_token_query, attributes=False),
        rendered(prompts.SUBJECT_ONLY),
        prompts.SUBJECT_ONLY,
        pseudo_tokens=True,
    )
)
IMAGE_ONLY = register(
    Method(
        "image-only",
        image_query,
        lambda text, subject, attributes: "(the reference image's CLIP feature alone; no text)",
        image_feature=True,
        text=False,
    )
)
TEXT_ONLY = register(Method("text-only", text_query, lambda text, subject, attributes: text))
IMAGE_TEXT = register(Method("image+text", image_text_query, _image_text_sentence, image_feature=True))
