"""One error tree for the whole testbed; the CLI maps each class to an exit code.

Messages name the object and the fix. Raise these at the boundary where a
library error (NetlinkError, MqttError, OSError, pydantic) is understood; never log and
carry on.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_EXPECTATION",
    "EXIT_BAD_INPUT",
    "EXIT_INFEASIBLE",
    "EXIT_RESOURCE",
    "EXIT_RUN_FAILED",
    "TestbedError",
    "InputError",
    "TopologyError",
    "InfeasibleError",
    "ResourceError",
    "ShapingError",
    "RelayError",
    "WorkloadError",
    "RunFailedError",
    "ExpectationFailed",
]

EXIT_OK = 0
EXIT_EXPECTATION = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_RESOURCE = 4
EXIT_RUN_FAILED = 5


class TestbedError(Exception):
    """Base of every error the testbed reports to a user."""

    exit_code = EXIT_RUN_FAILED
    __test__ = False  # not a pytest test class despite the name


class InputError(TestbedError):
    """Bad input from the user: an option, a prompt, a model name."""

    exit_code = EXIT_BAD_INPUT


class TopologyError(InputError):
    """A topology file (or CLI override) is malformed or invalid."""


class InfeasibleError(TestbedError):
    """The budgets admit no device (or no run)."""

    exit_code = EXIT_INFEASIBLE


class ResourceError(TestbedError):
    """A missing privilege or resource: root, Docker, a kernel feature, a binary."""

    exit_code = EXIT_RESOURCE


class ShapingError(TestbedError):
    """Traffic control could not be planned, applied or read back."""

    exit_code = EXIT_RESOURCE


class RelayError(TestbedError):
    """A relay message or the MQTT transport failed."""

    exit_code = EXIT_RUN_FAILED


class WorkloadError(TestbedError):
    """A model could not be loaded, or a stage could not run."""

    exit_code = EXIT_RUN_FAILED


class RunFailedError(TestbedError):
    """A run could not finish (e.g. recovery impossible)."""

    exit_code = EXIT_RUN_FAILED


class ExpectationFailed(TestbedError):
    """A scenario's `expect:` block did not hold."""

    exit_code = EXIT_EXPECTATION
