"""What the backup target's client accepts before it talks to any server."""

from __future__ import annotations

import pytest

from cargohold.clients.objectstore import ObjectStore, check_endpoint, parse_url
from cargohold.errors import InvalidArgument


def test_target_urls() -> None:
    assert parse_url("s3://backups") == ("backups", "")
    assert parse_url("s3://backups/cluster-a/") == ("backups", "cluster-a/")
    assert parse_url("s3://my.bucket-1/a/b") == ("my.bucket-1", "a/b/")
    for bad in ("backups", "http://backups/x", "s3://", "s3://B", "s3://ab", "s3://x?y=1",
                "s3://bucket/a//b", "s3://bucket/a b", "s3://bucket/é", "s3://" + "a" * 64):
        with pytest.raises(InvalidArgument):
            parse_url(bad)


def test_endpoints_and_regions() -> None:
    for good in ("", "http://127.0.0.1:9000", "https://s3.example", "http://[::1]:8333/"):
        check_endpoint(good)
    for bad in ("127.0.0.1:9000", "ftp://x", "http://", "http://h:0", "http://h:99999",
                "http://h/path", "http://h?x", "https://h#f"):
        with pytest.raises(InvalidArgument):
            check_endpoint(bad)
    with pytest.raises(InvalidArgument, match="region"):
        ObjectStore("s3://backups", "http://127.0.0.1:9", region="Not A Region")
