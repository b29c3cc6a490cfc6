"""Authentication and gated access, against a local stand-in for the Hub (no network).

A threaded ``http.server`` on 127.0.0.1 answers ``/api/models/<id>/auth-check`` and
``/api/whoami-v2`` with the status codes and ``X-Error-Code`` / ``X-Error-Message`` headers the real
Hub sends, so ``huggingface_hub``'s own session and ``hf_raise_for_status`` raise their real
exception types (GatedRepoError, RepositoryNotFoundError, HfHubHTTPError 401, ...).
Fake tokens contain ``_`` after the prefix so they never look like real ones to test_no_secrets.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli_helpers import run_cli

from medgemma_lib.setup import auth

GOOD = "hf_fake_accepted_token_0001"  # accepted the MedGemma terms
NOT_ACCEPTED = "hf_fake_pending_token_0002"  # valid account, terms not accepted
REVOKED = "hf_fake_revoked_token_0003"
EXISTING = {"google/medgemma-4b-it", "google/medgemma-27b-text-it", "google/medgemma-27b-it"}


class FakeHub(BaseHTTPRequestHandler):
    """Answers like huggingface.co does (status, X-Error-Code, X-Error-Message, JSON body)."""

    def log_message(self, *args):  # keep test output clean (and never log headers)
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.server.requests.append(self.path)
        auth_header = self.headers.get("authorization", "")
        token = auth_header.removeprefix("Bearer ").strip() or None
        if token is not None and token not in (GOOD, NOT_ACCEPTED):
            msg = "Invalid credentials in Authorization header"
            return self._send(401, {"error": msg}, {"X-Error-Message": msg})
        if self.path == "/api/whoami-v2":
            if token is None:
                return self._send(401, {"error": "Invalid username or password."})
            return self._send(
                200,
                {
                    "type": "user",
                    "name": "student01",
                    "auth": {"type": "access_token", "accessToken": {"displayName": "course", "role": "read"}},
                },
            )
        m = re.fullmatch(r"/api/models/(.+)/auth-check", self.path)
        if not m:
            return self._send(404, {"error": "Not Found"})
        repo = m.group(1)
        if repo not in EXISTING:
            # The Hub answers 401 to anonymous and 404 to authenticated requests, RepoNotFound in both.
            code = 401 if token is None else 404
            return self._send(
                code,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )
        if token is None:
            msg = (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated to access it. "
                "Please log in."
            )
            return self._send(401, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
        if token == NOT_ACCEPTED:
            msg = (
                f"Access to model {repo} is restricted and you are not in the authorized list. "
                f"Visit https://huggingface.co/{repo} to ask for access."
            )
            return self._send(403, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
        return self._send(200, {})


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """Start the stand-in Hub; it stops at teardown, or by itself after 120 s at the latest."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", *auth.MISSPELLED_TOKEN_VARS):
        monkeypatch.delenv(var, raising=False)
    try:
        yield server, url
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_mask_token_never_reveals_the_secret():
    token = "hf_" + "Q" * 30 + "wxyz"
    masked = auth.mask_token(token)
    assert masked == "hf_…wxyz"
    assert "Q" not in masked
    assert auth.mask_token(None) == "（無）"
    assert auth.mask_token("hf_short") == "hf_…"  # short strings show no tail at all


def test_token_sources_in_order(monkeypatch, tmp_path):
    from huggingface_hub import constants

    stored = tmp_path / "token"
    stored.write_text("hf_fake_stored_login_0004\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_environment_0005")
    assert auth.find_token("hf_fake_argument_0006") == ("hf_fake_argument_0006", "argument")
    assert auth.find_token() == ("hf_fake_environment_0005", "HF_TOKEN")
    monkeypatch.delenv("HF_TOKEN")
    assert auth.find_token() == ("hf_fake_stored_login_0004", "login")
    stored.unlink()
    assert auth.find_token() == (None, "none")


def test_access_ok(fake_hub):
    server, _ = fake_hub
    result = auth.check_access("google/medgemma-4b-it", GOOD)
    assert result.ok and result.status == auth.OK
    assert result.masked_token == "hf_…0001"
    assert server.requests == ["/api/models/google/medgemma-4b-it/auth-check"]


def test_access_accepts_profile_names(fake_hub):
    server, _ = fake_hub
    assert auth.check_access("medgemma-27b-text-it", GOOD).ok
    assert server.requests[-1] == "/api/models/google/medgemma-27b-text-it/auth-check"


def test_no_token_needs_no_request_and_flags_misspelled_variable(fake_hub, monkeypatch):
    server, _ = fake_hub
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_fake_wrong_variable_0007")
    result = auth.check_access("google/medgemma-4b-it")
    assert result.status == auth.NO_TOKEN
    assert "權杖" in result.message and "HUGGINGFACE_TOKEN" in result.hint and "HF_TOKEN" in result.hint
    assert server.requests == []


def test_invalid_token_is_401(fake_hub):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    # The real client raises the generic HTTP error (not RepositoryNotFound) for this 401.
    with pytest.raises(HfHubHTTPError) as info:
        auth._auth_check_request("google/medgemma-4b-it", REVOKED, None, 5)
    assert info.value.response.status_code == 401 and not isinstance(info.value, RepositoryNotFoundError)
    result = auth.check_access("google/medgemma-4b-it", REVOKED)
    assert result.status == auth.INVALID_TOKEN
    assert "401" in result.message and "無效" in result.message


def test_gated_not_accepted_is_403_with_model_page(fake_hub):
    from huggingface_hub.errors import GatedRepoError

    with pytest.raises(GatedRepoError):
        auth._auth_check_request("google/medgemma-27b-text-it", NOT_ACCEPTED, None, 5)
    result = auth.check_access("google/medgemma-27b-text-it", NOT_ACCEPTED)
    assert result.status == auth.GATED
    assert "https://huggingface.co/google/medgemma-27b-text-it" in result.hint
    assert "403" in result.message


def test_wrong_model_id_is_404_with_suggestion(fake_hub):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError) as info:
        auth._auth_check_request("google/medgemma-4b-multimodal", GOOD, None, 5)
    assert not isinstance(info.value, GatedRepoError)
    result = auth.check_access("google/medgemma-4b-multimodal", GOOD)
    assert result.status == auth.NOT_FOUND
    assert result.suggestion == "google/medgemma-4b-it"
    assert "google/medgemma-4b-it" in result.hint and "404" in result.message
    # a typo close to a real id gets the closest real id
    assert auth.check_access("google/medgema-4b-it", GOOD).suggestion == "google/medgemma-4b-it"


def test_offline_mode_explains_demo(fake_hub, monkeypatch):
    from huggingface_hub import constants

    server, _ = fake_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = auth.check_access("google/medgemma-4b-it", GOOD)
    assert result.status == auth.OFFLINE and "demo" in result.hint
    assert server.requests == []


def test_offline_exception_from_the_real_client_is_classified(fake_hub, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled) as info:
        auth._auth_check_request("google/medgemma-4b-it", GOOD, None, 5)
    assert auth.classify_hub_error(info.value) == auth.OFFLINE


def test_network_failure(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    result = auth.check_access("google/medgemma-4b-it", GOOD, timeout=3)
    assert result.status == auth.NETWORK
    assert "demo" in result.hint


def test_each_outcome_has_its_own_chinese_message():
    codes = [
        auth.OK,
        auth.NO_TOKEN,
        auth.INVALID_TOKEN,
        auth.GATED,
        auth.NOT_FOUND,
        auth.OFFLINE,
        auth.NETWORK,
        auth.FORBIDDEN,
        auth.HUB_ERROR,
    ]
    messages = {auth._result("google/medgemma-4b-it", c, "HF_TOKEN", GOOD).message for c in codes}
    assert len(messages) == len(codes)
    assert all(re.search(r"[\u4e00-\u9fff]", m) for m in messages)


def test_whoami_masks_token(fake_hub):
    info = auth.whoami(GOOD)
    assert info == {"name": "student01", "token_source": "argument", "masked_token": "hf_…0001", "role": "read"}
    with pytest.raises(auth.AuthError) as err:
        auth.whoami(REVOKED)
    assert "401" in err.value.message


def test_require_access_raises_chinese_auth_error(fake_hub):
    with pytest.raises(auth.AuthError) as err:
        auth.require_access("google/medgemma-4b-it", NOT_ACCEPTED)
    assert "存取權" in str(err.value) and "huggingface.co/google/medgemma-4b-it" in str(err.value)


def _cli(url: str | None, *args: str, token: str | None = None, home=None, offline: bool = False):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE")
    }
    env["HF_HOME"] = str(home)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if url:
        env["HF_ENDPOINT"] = url
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return run_cli("auth", *args, env=env, timeout=120)


@pytest.mark.slow
def test_cli_exit_codes_and_no_token_echo(fake_hub, tmp_path):
    _, url = fake_hub
    ok = _cli(url, "check", "--model", "google/medgemma-4b-it", token=GOOD, home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "可以存取" in ok.stdout and "hf_…0001" in ok.stdout
    gated = _cli(url, "check", "--model", "google/medgemma-4b-it", token=NOT_ACCEPTED, home=tmp_path)
    assert gated.returncode == 2 and "同意使用條款" in gated.stdout
    wrong = _cli(url, "check", "--model", "google/medgemma-4b-multimodal", token=GOOD, home=tmp_path)
    assert wrong.returncode == 2 and "google/medgemma-4b-it" in wrong.stdout
    none = _cli(url, "check", token=None, home=tmp_path)
    assert none.returncode == 2 and "找不到" in none.stdout
    offline = _cli(url, "check", token=GOOD, home=tmp_path, offline=True)
    assert offline.returncode == 2 and "離線" in offline.stdout
    who = _cli(url, "whoami", token=GOOD, home=tmp_path)
    assert who.returncode == 0 and "student01" in who.stdout
    bad_who = _cli(url, "whoami", token=REVOKED, home=tmp_path)
    assert bad_who.returncode == 2 and "401" in bad_who.stderr and "Traceback" not in bad_who.stderr
    for run in (ok, gated, wrong, none, offline, who, bad_who):
        for secret in (GOOD, NOT_ACCEPTED, REVOKED):
            assert secret not in run.stdout + run.stderr


def test_cli_uses_stored_login(fake_hub, tmp_path):
    _, url = fake_hub
    (tmp_path / "token").write_text(GOOD)
    run = _cli(url, "check", home=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hf auth login" in run.stdout


def test_use_token_sets_process_token_only(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert auth.use_token("  hf_fake_widget_token_0008 ") == "hf_…0008"
    assert os.environ["HF_TOKEN"] == "hf_fake_widget_token_0008"
    assert not (tmp_path / "token").exists()
    with pytest.raises(auth.AuthError):
        auth.use_token("   ")


def test_token_widget_clears_box_and_prints_only_masked(fake_hub, monkeypatch, capsys):
    pytest.importorskip("ipywidgets")
    widget = auth.token_widget("google/medgemma-4b-it")
    box, button = widget.children[0].children
    out = widget.children[2]
    box.value = GOOD
    button.click()
    assert box.value == ""
    assert os.environ["HF_TOKEN"] == GOOD
    # outside a kernel the Output widget passes prints through to stdout
    printed = "".join(o.get("text", "") for o in out.outputs) + capsys.readouterr().out
    assert "hf_…0001" in printed and "可以存取" in printed
    assert GOOD not in printed
    monkeypatch.delenv("HF_TOKEN")


def test_format_suggestions_one_line_per_wrong_id():
    lines = auth.format_suggestions(
        ["google/medgemma-4b-multimodal", "google/medgema-4b-it", "x/unrelated"]
    ).splitlines()
    assert len(lines) == 3 and all(" → " in line for line in lines)
    assert lines[0].endswith(auth.suggest_model_id("google/medgemma-4b-multimodal"))
    assert lines[1].endswith("google/medgemma-4b-it") and lines[2].endswith("None")
    assert lines[0].index("→") == 33  # ids padded to 32 columns, so the arrows line up
