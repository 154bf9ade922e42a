"""Name -> class registries, and loading tasks by import path or by installed entry point
(the built-in tasks are entry points of this package, so the core imports none of them)."""

import importlib
import inspect
from importlib import metadata
from typing import Callable, Generic, Iterable, TypeVar

from mtss_train.errors import MtssError

T = TypeVar("T")

ENTRY_POINT_GROUP = "mtss_train.tasks"


class Registry(Generic[T]):
    """Maps names to registered objects; duplicates and unknown names are errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sites: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that registers its argument as `name` and returns it unchanged.

        Registering the same object again (e.g. on a re-import) is allowed.

        Raises:
          ValueError: `name` is already registered by another definition; the message
            names the file and line of the first one.
        """

        def decorator(item: T) -> T:
            site = _definition_site(item)
            if name in self._items and self._sites[name] != site:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._sites[name]}"
                )
            self._items[name] = item
            self._sites[name] = site
            return item

        return decorator

    def get(self, name: str, also_known: Iterable[str] = ()) -> T:
        """The object registered as `name`; `also_known` are names the error lists too."""
        if name not in self._items:
            raise MtssError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted({*self._items, *also_known}))} "
                "(or pass module.path:ClassName)"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)


def _definition_site(item: object) -> str:
    try:
        return f"{inspect.getsourcefile(item)}:{inspect.getsourcelines(item)[1]}"
    except (TypeError, OSError):
        return repr(item)


def installed_names(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Names of the installed plugins of `group`, without importing them."""
    return sorted({entry_point.name for entry_point in metadata.entry_points(group=group)})


def load_entry_point(registry: Registry, name: str, group: str = ENTRY_POINT_GROUP) -> bool:
    """Imports the installed plugin `name` of `group` (`[project.entry-points."mtss_train.tasks"]`,
    where the built-in tasks are declared too) and registers it; False if none has that name.
    Only the one asked for is imported, so a broken plugin breaks only runs that use it."""
    found = False
    for entry_point in metadata.entry_points(group=group, name=name):
        try:
            item = entry_point.load()
        except Exception as e:  # A broken plugin must name itself, whatever it raised.
            raise MtssError(
                f"installed {registry.kind} plugin {entry_point.name!r} = {entry_point.value!r} "
                f"failed to load: {type(e).__name__}: {e}"
            ) from None
        registry.register(entry_point.name)(item)
        found = True
    return found


def load_by_path(spec: str) -> object:
    """Imports `package.module:Attribute`."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MtssError(f"cannot import {module_name!r} for {spec!r}: {e}") from None
    if not hasattr(module, attribute):
        raise MtssError(f"module {module_name!r} has no attribute {attribute!r} (from {spec!r})")
    return getattr(module, attribute)
