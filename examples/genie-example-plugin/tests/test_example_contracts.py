"""This package's components against genie's contracts: one decorator from genie's contract kit runs every check of
every component this package registers (the tokenizer's shapes, determinism, round trip, causality in time, that it
learns), as genie's own tests do for its built-in components."""

from genie_core.testing import parametrize_contracts


@parametrize_contracts(package="genie-example-plugin")
def test_contract(contract):
    contract()
