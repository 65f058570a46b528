"""One config style for every saved model: a validated dataclass is the single source of its fields.

A model class (diffusers ``ModelMixin`` + ``ConfigMixin``) declares its configuration once, as a dataclass whose
``__post_init__`` validates it, and builds its modules from a validated instance::

    @dataclass
    class LlamaGenConfig:
        dim: int = 4096
        ...
        def __post_init__(self): ...      # raise ValueError naming the field

    class LlamaGen(ModelMixin, ConfigMixin):
        @config_init(LlamaGenConfig)
        def __init__(self, cfg: LlamaGenConfig):
            super().__init__()
            self.args = cfg
            ...

:func:`config_init` turns that ``__init__`` into a constructor whose keyword arguments are exactly the dataclass
fields (names, defaults, order), so ``LlamaGen(dim=768, n_layer=12)``, ``save_pretrained`` / ``from_pretrained``
(``config.json`` holds the fields) and ``from_config`` all go through the same validation.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from diffusers.configuration_utils import register_to_config

__all__ = ["config_init", "config_fields"]

T = TypeVar("T")


def config_fields(config_cls: type) -> tuple[str, ...]:
    """The field names of a config dataclass, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(config_cls))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return inspect.Parameter.empty


def config_init(config_cls: type[T]) -> Callable[[Callable[[Any, T], None]], Callable[..., None]]:
    """Decorator for ``__init__(self, cfg)`` of a ConfigMixin model: the resulting constructor takes the fields of
    ``config_cls`` as arguments, builds (and so validates) ``config_cls(**fields)``, registers the fields with
    diffusers' config and calls the decorated ``__init__`` with the instance."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_default(f))
        for f in dataclasses.fields(config_cls)
    ]
    signature = inspect.Signature(params)

    def decorator(build: Callable[[Any, T], None]) -> Callable[..., None]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as e:
                raise TypeError(
                    f"{type(self).__name__}: {e}; expected fields of {config_cls.__name__}: "
                    f"{list(config_fields(config_cls))}"
                ) from None
            bound.apply_defaults()
            values = dict(bound.arguments)
            values.pop("self")
            build(self, config_cls(**values))

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        __init__.__doc__ = build.__doc__
        __init__.__qualname__ = build.__qualname__
        return register_to_config(__init__)

    return decorator
