import argparse

import jax
import pytest

from agentlm_jax import cli
from agentlm_jax.errors import ConfigError


def test_a_mesh_larger_than_the_devices_is_refused_not_shrunk():
    with pytest.raises(ConfigError, match=rf"--fsdp 100 × --tensor 1 needs 100 devices, but there are "
                                          rf"{jax.device_count()}"):
        cli.cli_mesh(argparse.Namespace(fsdp=100, tensor=1))
    assert dict(cli.cli_mesh(argparse.Namespace(fsdp=2, tensor=2)).shape) == {"data": 1, "fsdp": 2, "tensor": 2}


def test_a_user_error_is_one_line_and_status_1():
    def fail():
        raise ConfigError("model.vocab_size: wrong")

    with pytest.raises(SystemExit) as e:
        cli.run_reporting_errors(fail)
    assert e.value.code == "error: model.vocab_size: wrong"  # sys.exit(str): printed to stderr, status 1
