"""``trainfleet doctor``: the pre-flight checks of a launch layout, then a test all-reduce."""
from __future__ import annotations

import argparse
from typing import Any

from trainfleet.cli.launch_args import add_launch_arguments, config_from_args


def run_doctor(ns: argparse.Namespace) -> int:
    from trainfleet.launcher.doctor import PROBE, doctor

    ns.target, ns.args, ns.module = PROBE, [], True
    return doctor(config_from_args(ns))


def add_doctor_command(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="pre-flight checks and a test all-reduce for a launch layout")
    add_launch_arguments(doctor)
    doctor.set_defaults(func=run_doctor)
