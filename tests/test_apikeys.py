"""API keys (common/apikeys.py and `sdxl-serve keys`): made once, kept only as digests, revocable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.apikeys import (
    KeyRing,
    KeysFileError,
    digest,
    is_webhook_secret,
    key_line,
    load_keys_file,
    new_key,
    parse_keys_file,
)
from gateway.cli import gateway_config
from sdxl_serve.cli import build_parser


def test_new_keys_are_random_and_hashed_with_sha256() -> None:
    key = new_key()
    assert key.startswith("sdxl_") and len(key) > 40 and new_key() != key
    assert digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert key_line(key, "alice") == f"{digest(key)}  # alice"


def test_the_keys_file_lists_active_and_revoked_digests() -> None:
    a, b, c = (digest(k) for k in ("a", "b", "c"))
    text = f"# keys\n\n{a}  # alice\nsha256:{b.upper()} revoked # bob, leaked\n{c} active\n{c} revoked\n"
    ring = parse_keys_file(text)
    assert ring.active == {a} and ring.revoked == {b, c}  # a key revoked anywhere is revoked
    assert repr(ring) == "KeyRing(1 active, 2 revoked)"  # what a log may show: counts only


def test_an_admin_line_marks_a_key_that_sees_every_callers_jobs() -> None:
    a, b, c = (digest(k) for k in ("a", "b", "c"))
    ring = parse_keys_file(f"{a} admin  # operator\n{b}\n{c} admin\n{c} revoked\n")
    assert ring.active == {a, b} and ring.admins == {a} and ring.revoked == {c}  # revocation wins
    assert repr(ring) == "KeyRing(2 active, 1 revoked, 1 admin)"
    assert KeyRing.from_keys(["x"]).merged(ring).admins == {a}
    assert key_line("k", "ops", admin=True) == f"{digest('k')} admin  # ops"
    made = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "keys", "new", "--admin"], capture_output=True, text=True, check=True
    )
    key, line = made.stdout.splitlines()
    assert parse_keys_file(line).admins == {digest(key)}


@pytest.mark.parametrize("line", ["not-a-digest", "abc123", f"{digest('a')} disabled", f"{digest('a')} revoked x"])
def test_a_bad_line_is_named(line: str) -> None:
    with pytest.raises(KeysFileError, match="line 2"):
        parse_keys_file(f"# ok\n{line}\n")


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read"):
        load_keys_file(tmp_path / "missing")


def test_rings_merge_with_revocation_winning() -> None:
    env = KeyRing.from_keys(["a", "b"])
    file = KeyRing(active=frozenset({digest("c")}), revoked=frozenset({digest("b")}))
    merged = env.merged(file)
    assert merged.active == {digest("a"), digest("c")} and merged.revoked == {digest("b")}


def test_keys_from_the_environment_are_kept_as_digests_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_SERVE_API_KEYS", "sdxl_first, sdxl_second")
    config = gateway_config(build_parser().parse_args(["gateway"]))
    assert config.auth_enabled and config.api_keys.active == {digest("sdxl_first"), digest("sdxl_second")}
    assert "sdxl_first" not in repr(config) and "sdxl_first" not in str(config)


def test_the_cli_makes_a_key_and_hashes_existing_ones() -> None:
    made = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "keys", "new", "--label", "ci"], capture_output=True, text=True, check=True
    )
    key, line = made.stdout.splitlines()
    assert line == f"{digest(key)}  # ci"
    assert parse_keys_file(line).active == {digest(key)}
    hashed = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "keys", "hash"],
        input=f"{key}\n\nabc\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert hashed.stdout.splitlines() == [digest(key), digest("abc")]


def test_a_bad_keys_file_stops_the_gateway_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("not a digest\n")
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "gateway", "--api-keys-file", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--api-keys-file" in done.stderr and "line 1" in done.stderr


def test_a_key_made_with_a_webhook_secret_carries_it_on_its_line() -> None:
    made = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "keys", "new", "--webhook-secret"],
        capture_output=True,
        text=True,
        check=True,
    )
    key, line, secret = made.stdout.splitlines()
    assert is_webhook_secret(secret) and line == f"{digest(key)} {secret}"
    ring = parse_keys_file(line + "\n" + key_line("other", admin=True))
    assert ring.webhook_secret(f"key-{digest(key)[:16]}") == secret
    assert ring.webhook_secret(f"key-{digest('other')[:16]}") is None
    with pytest.raises(KeysFileError, match="line 1"):
        parse_keys_file(f"{digest(key)} whsec_not-base64")
