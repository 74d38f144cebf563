"""What the configuration knows of soup methods: each method's settings model (its switch
``enabled`` and the rest), its version, the methods it needs and whether its result is one
model. A method declares itself here when it registers (pipeline/soup/methods/base.register);
this module sits below config.py, which validates ``soup.methods.<name>`` against it and never
imports the soup package.

Methods are found in two places: the built-in ones (``pipeline.soup.methods``) and any
installed distribution's entry points in the group ``frankensoup.soup_methods`` (each names a
module that registers its methods when imported; see docs/design.md, "Adding things")."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import UserError

ENTRY_POINT_GROUP = "frankensoup.soup_methods"
BUILTIN_MODULE = "pipeline.soup.methods"


class MethodSpecError(UserError, ValueError):
    """A method declared twice, or a plugin that cannot be loaded; the message names it."""


class MethodSettings(BaseModel):
    """Base of every method's settings: subclass it, add fields (with descriptions), and give
    ``enabled`` the default the method should have."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    enabled: bool = Field(True, description="whether the soup stage makes this method's row")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings: type[MethodSettings]
    version: int                      # bump when the method's code changes its result
    needs: tuple[str, ...] = ()       # methods whose results it reads
    one_model: bool = True            # False: not one set of weights (the output ensemble), never published
    summary: str = ""                 # what it is, one line (report.md, the model card)
    marker: tuple[str, str] = ("o", "tab:purple")  # plot marker and colour (report/plots.py)

    @property
    def enabled_by_default(self) -> bool:
        return bool(self.settings.model_fields["enabled"].default)


SPECS: dict[str, MethodSpec] = {}
_loaded = False


def declare(spec: MethodSpec) -> None:
    old = SPECS.get(spec.name)
    if old is not None and old.settings.__qualname__ != spec.settings.__qualname__:
        raise MethodSpecError(f"soup method {spec.name!r} is declared twice ({old.settings.__module__}, "
                              f"{spec.settings.__module__})")
    SPECS[spec.name] = spec


def withdraw(name: str) -> None:
    SPECS.pop(name, None)


def load() -> dict[str, MethodSpec]:
    """Import the built-in methods and every installed plugin (once per process); the specs, in
    registration order."""
    global _loaded
    if not _loaded:
        _loaded = True  # set first: a plugin importing the soup package must not recurse here
        importlib.import_module(BUILTIN_MODULE)
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:
                raise MethodSpecError(f"soup method plugin {ep.name!r} ({ep.value}, entry point group "
                                      f"{ENTRY_POINT_GROUP}) failed to load: {type(e).__name__}: {e}") from None
    return SPECS


def settings_of(methods: dict[str, Any], name: str) -> MethodSettings:
    """A method's settings from a validated ``soup.methods``; its defaults when it is not there
    (a method registered after the config was loaded)."""
    found = methods.get(name)
    return found if found is not None else SPECS[name].settings()


def validate(raw: Any) -> dict[str, MethodSettings]:
    """``soup.methods`` as given -> every declared method's settings, in registration order.
    A wrong value raises pydantic's ValidationError located at ``<name>.<field>``; an unknown
    method name is an extra input."""
    specs = load()
    parsed = methods_model().model_validate(raw if raw is not None else {})
    return {name: getattr(parsed, name) for name in specs}


def methods_model() -> type[BaseModel]:
    """``soup.methods`` as one pydantic model: a field per declared method (its settings model),
    so validation and ``frankensoup config schema`` see the same thing."""
    return create_model("SoupMethods", __config__=ConfigDict(extra="forbid"),
                        **{name: (spec.settings, Field(default_factory=spec.settings,
                                                       description=f"the {name} soup method's settings"))
                           for name, spec in load().items()})


def json_schema(config_schema: dict) -> dict:
    """``config_schema`` (``Config.model_json_schema()``) with ``soup.methods`` spelled out: each
    method's own settings, as declared when it registered."""
    methods = methods_model().model_json_schema(ref_template="#/$defs/{model}")
    defs = config_schema.setdefault("$defs", {})
    defs.update(methods.pop("$defs", {}))
    target = defs["SoupConfig"]["properties"]["methods"]
    defs["SoupMethods"] = methods
    config_schema["$defs"]["SoupConfig"]["properties"]["methods"] = {
        "$ref": "#/$defs/SoupMethods", "description": target.get("description", "")}
    return config_schema


def check_enabled(methods: dict[str, MethodSettings]) -> None:
    """Every enabled method's needs are enabled (ValueError naming both)."""
    for name, spec in SPECS.items():
        if not settings_of(methods, name).enabled:
            continue
        off = [n for n in spec.needs if not settings_of(methods, n).enabled]
        if off:
            raise ValueError(f"{name} needs {', '.join(off)}, which is disabled "
                             f"(soup.methods.{off[0]}.enabled=false)")


def check_publishable(methods: dict[str, MethodSettings], name: str) -> None:
    """``soup.publish`` names an enabled method whose result is one model (ValueError saying why not)."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"{name!r} is no soup method (known: {', '.join(SPECS)})")
    if not spec.one_model:
        raise ValueError(f"{name!r} is not one model (its outputs are averaged over several): publish a "
                         "weight-space method")
    if not settings_of(methods, name).enabled:
        raise ValueError(f"{name!r} is disabled (soup.methods.{name}.enabled=false)")


__all__ = ["ENTRY_POINT_GROUP", "MethodSettings", "MethodSpec", "MethodSpecError", "SPECS", "ValidationError",
           "check_enabled", "check_publishable", "declare", "json_schema", "load", "methods_model", "settings_of",
           "validate", "withdraw"]
