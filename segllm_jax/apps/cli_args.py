"""Argument types and cheap input checks of the ``segllm-jax`` command: a mistake is caught while parsing
or before anything loads, and reported as one sentence (the error policy of :mod:`segllm_jax.apps.cli`)."""

from __future__ import annotations

import argparse
import math
import socket
from pathlib import Path
from typing import Callable

from segllm_jax.errors import InputError

# ---- argument types: mistakes are caught while parsing, before anything loads --------------------


def _number(kind: type, low: float | None, high: float | None, what: str,
            above_low: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite ``kind`` number in [low, high] (or (low, high] with ``above_low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if above_low else value < low)
        if too_low or (high is not None and value > high):
            lower = f"above {low:g}" if above_low else f"at least {low:g}"
            bounds = f"{lower} and at most {high:g}" if high is not None else lower
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value

    parse.__name__ = what
    return parse


def positive_int(high: int | None = None) -> Callable[[str], int]:
    return _number(int, 1, high, "a whole number")


def non_negative_int(high: int | None = None) -> Callable[[str], int]:
    return _number(int, 0, high, "a whole number")


def positive_float(high: float | None = None) -> Callable[[str], float]:
    return _number(float, 0, high, "a number", above_low=True)


PORT = _number(int, 1, 65535, "a port number")


def existing_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block) and exit code 2, like every other error."""

    def error(self, message: str):  # argparse's hook
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help.\n")


# ---- input checks shared by the commands ------------------------------------------------------------


def check_segllm_checkpoint(directory: str) -> None:
    """The folder must hold a loadable SegLLM (config, params, tokenizer) before JAX is imported."""
    from segllm_jax import checkpoint_folder

    checkpoint_folder.inspect(directory, kinds=("segllm",), tokenizer=True)


def check_port_is_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InputError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port.") from None


def read_script(path: str) -> list[str]:
    """The script's lines, decoded strictly: a bad byte is reported with its line, before anything is written."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the script {path}: {e.strerror}.") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"the script {path} is not UTF-8 text (line {line}); save it as UTF-8.") from None
