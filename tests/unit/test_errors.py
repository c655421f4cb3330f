"""The error tree and its mapping in each adapter."""

from __future__ import annotations

from cargohold import errors
from cargohold.adapters.rest import HTTP_STATUS
from cargohold.cli import EXIT_CODES


def _all(cls: type[errors.CargoholdError]) -> list[type[errors.CargoholdError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _all(sub)
    return found


def test_codes_are_unique_and_every_kind_is_mapped_by_each_adapter() -> None:
    classes = _all(errors.CargoholdError)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for kind in errors.Kind:
        assert kind in HTTP_STATUS
        assert kind in EXIT_CODES


def test_message_is_formatted_from_the_docstring() -> None:
    err = errors.VolumeInUse(name="pg", node="h1")
    assert err.message.startswith("Volume 'pg' is attached on node 'h1'")
    assert err.to_dict() == {"code": "volume_in_use", "message": err.message}


def test_error_round_trips_through_an_api_body() -> None:
    err = errors.NotEnoughDataServers(replicas=3, available=2, where="")
    back = errors.from_dict(err.to_dict())
    assert isinstance(back, errors.NotEnoughDataServers)
    assert back.message == err.message and back.kind is errors.Kind.CONFLICT
    assert type(errors.from_dict({"code": "nonsense", "message": "x"})) is errors.CargoholdError


def test_a_message_is_the_whole_first_paragraph_of_the_docstring() -> None:
    from cargohold.errors import TooManySnapshots

    message = TooManySnapshots(name="pg", count=1024).message
    assert message == ("Volume 'pg' keeps 1024 snapshots, the most a volume may keep. Remove "
                       "some ('cargohold snapshot rm') before taking more.")


def test_every_error_is_rebuilt_from_its_code() -> None:
    from cargohold import errors

    def every(cls: type[errors.CargoholdError]) -> list[type[errors.CargoholdError]]:
        return [cls] + [found for sub in cls.__subclasses__() for found in every(sub)]

    for cls in every(errors.CargoholdError):
        assert type(errors.from_dict({"code": cls.code, "message": "m"})).code == cls.code
