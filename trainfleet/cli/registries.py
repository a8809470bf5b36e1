"""``trainfleet models`` and ``trainfleet datasets``: what the registries hold."""
from __future__ import annotations

import argparse
from typing import Any


def _list_models(ns: argparse.Namespace) -> int:
    from trainfleet.models import list_models

    print("\n".join(list_models()))
    return 0


def _list_datasets(ns: argparse.Namespace) -> int:
    from trainfleet.datasets import list_datasets

    print("\n".join(list_datasets()))
    return 0


def add_registry_commands(sub: Any) -> None:
    sub.add_parser("models", help="list registered models").set_defaults(func=_list_models)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(func=_list_datasets)
