"""The product's exceptions are one shallow tree under IntergiroReceiverError, drawn once (in
receiver/errors.py's docstring) and drawn true; a merchant's handler finds its exceptions in a public
module, and under the old name it was told about."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import receiver
import receiver.errors
import workers
from receiver.errors import IntergiroReceiverError

# A drawn line: its depth (the column of `+--`), the class, and the module after the dots.
DRAWN = re.compile(r"^(?P<indent>[ |]*)\+-- (?P<name>\w+)\W*(?P<module>[a-z_.]+)[:( ]?")


def product_modules() -> list[ModuleType]:
    modules = []
    for package in (receiver, workers):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue  # runs the command line when imported
            modules.append(importlib.import_module(info.name))
    return modules


def product_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in receiver/ and workers/, by name."""
    found: dict[str, type[BaseException]] = {}
    for module in product_modules():
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                assert name not in found or found[name] is value, f"two exception classes named {name}"
                found[name] = value
    return found


def drawn_tree() -> dict[str, tuple[str, str]]:
    """The tree in receiver/errors.py's docstring: each class's drawn parent and module."""
    doc = receiver.errors.__doc__ or ""
    lines = doc[doc.index("    IntergiroReceiverError\n") :].splitlines()[1:]
    drawn: dict[str, tuple[str, str]] = {}
    parents = ["IntergiroReceiverError"]
    for line in lines:
        match = DRAWN.match(line.removeprefix("    "))
        if match is None:
            break
        depth = (len(match["indent"]) - 1) // 5 + 1
        parents[depth:] = [match["name"]]
        drawn[match["name"]] = (parents[depth - 1], match["module"])
    return drawn


def test_every_exception_of_receiver_and_workers_derives_from_the_one_root() -> None:
    exceptions = product_exceptions()
    assert len(exceptions) > 20  # the walk found them
    strays = sorted(name for name, cls in exceptions.items() if not issubclass(cls, IntergiroReceiverError))
    assert strays == []


def test_the_drawn_tree_is_the_tree_of_the_real_classes() -> None:
    exceptions = product_exceptions()
    real = {}
    for name, cls in exceptions.items():
        if cls is IntergiroReceiverError:
            continue
        # The nearest product class above it (a builtin base kept for callers is not drawn as a parent).
        parent = next(base for base in cls.__mro__[1:] if base in exceptions.values())
        real[name] = (parent.__name__, cls.__module__)
    assert drawn_tree() == real


def test_builtin_bases_that_callers_catch_are_kept() -> None:
    from redis.exceptions import RedisError

    from receiver.intake import NotReplicated
    from receiver.status import StatusError
    from receiver.verify import DuplicateKey, Unrepresentable

    assert all(issubclass(cls, ValueError) for cls in (DuplicateKey, Unrepresentable, StatusError))
    assert issubclass(NotReplicated, RedisError)


def test_a_handler_imports_its_exceptions_from_the_public_module_or_the_old_path() -> None:
    import workers.delivery
    from receiver import handler_errors

    assert workers.delivery.PermanentDeliveryError is handler_errors.PermanentDeliveryError
    assert workers.delivery.DeliveryError is handler_errors.DeliveryError
    assert issubclass(handler_errors.PermanentDeliveryError, handler_errors.DeliveryError)
    assert not handler_errors.PermanentDeliveryError("no").retryable
    assert handler_errors.DeliveryError("later", retry_after=30).retryable
