"""A battery of bad inputs through every entry point: the config, the wrapping, the layers and
chains, the forward, the merges, saving and loading, the raw ops and the C++ core (rules, merges,
modules). Each case asserts the whole first line of its message: it names the argument, what was
expected and what was received. Legal inputs that are likely mistakes give the warning shown."""

import shutil

import pytest

from bad_input_helpers import TMP
from bad_inputs_api import API_CASES
from bad_inputs_core import CORE_CASES

CASES = API_CASES + CORE_CASES


@pytest.fixture(scope="module", autouse=True)
def _remove_tmp():
    yield
    shutil.rmtree(TMP, ignore_errors=True)


def test_the_battery_is_large():
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("call,kind,message", [pytest.param(c, k, m, id=i) for i, c, k, m in CASES])
def test_bad_input_gets_a_clear_message(call, kind, message):
    message = message.replace("{TMP}", TMP)
    if issubclass(kind, Warning):
        with pytest.warns(kind) as record:
            call()
        assert message in [str(w.message) for w in record]
        return
    with pytest.raises(kind) as info:
        call()
    assert str(info.value).splitlines()[0] == message
