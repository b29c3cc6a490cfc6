"""Hugging Face authentication and gated-model access (``python -m medgemma_lib auth``, notebook 02).

MedGemma checkpoints are *gated*: a user needs (1) a Hub access token and (2) to have accepted the
model's terms on its model page. :func:`check_access` asks the Hub's ``auth-check`` endpoint (through
``huggingface_hub``'s own HTTP session and error mapping) and turns every outcome into an
:class:`AccessResult` with a Traditional Chinese message.

Token sources, in order: an explicit argument, the ``HF_TOKEN`` environment variable, the token
stored by ``hf auth login`` / ``huggingface_hub.login``. The token itself is never printed, logged
or written anywhere by this module; only :func:`mask_token`'s ``hf_…abcd`` form is shown.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

import huggingface_hub
import pandas as pd
from huggingface_hub import HfApi, constants, login
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from medgemma_lib.core import display
from medgemma_lib.core.errors import AuthError
from medgemma_lib.core.profiles import PROFILES, WRONG_IDS

HUB_URL = "https://huggingface.co"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
DEFAULT_TIMEOUT_S = 15.0
# Names people set by mistake; huggingface_hub reads only HF_TOKEN (and the legacy HUGGING_FACE_HUB_TOKEN).
MISSPELLED_TOKEN_VARS = (
    "HUGGINGFACE_TOKEN",
    "HF_API_TOKEN",
    "HUGGINGFACEHUB_API_TOKEN",
    "HUGGINGFACE_HUB_TOKEN",
    "HF_ACCESS_TOKEN",
)

# Outcome codes of an access check.
OK = "ok"
NO_TOKEN = "no_token"
INVALID_TOKEN = "invalid_token"
GATED = "gated"
NOT_FOUND = "not_found"
OFFLINE = "offline"
NETWORK = "network_error"
FORBIDDEN = "forbidden"
HUB_ERROR = "hub_error"


def mask_token(token: str | None) -> str:
    """``hf_…abcd``: enough to tell two tokens apart, useless to an attacker. Never the whole token."""
    if not token:
        return "（無）"
    token = token.strip()
    prefix = "hf_" if token.startswith("hf_") else ""
    tail = token[-4:] if len(token) >= 12 else ""
    return f"{prefix}…{tail}"


def find_token(token: str | None = None) -> tuple[str | None, str]:
    """Return ``(token, source)``; source is ``argument``, ``HF_TOKEN``, ``login`` or ``none``.

    ``login`` is the file written by ``hf auth login`` (``$HF_HOME/token``); read through
    ``huggingface_hub`` so a custom ``HF_HOME`` / ``HF_TOKEN_PATH`` is honoured.
    """
    if token and token.strip():
        return token.strip(), "argument"
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip(), "HF_TOKEN"
    stored = huggingface_hub.get_token()  # the login file (HF_HOME / HF_TOKEN_PATH honoured); env was checked above
    if stored:
        return stored, "login"
    return None, "none"


SOURCE_NAMES = {
    "argument": "直接傳入的參數",
    "HF_TOKEN": "環境變數 HF_TOKEN",
    "login": "huggingface_hub 儲存的登入（hf auth login）",
    "none": "沒有找到",
}


@dataclass
class AccessResult:
    """Outcome of :func:`check_access`. ``message``/``hint`` are Traditional Chinese."""

    model_id: str
    status: str
    message: str
    hint: str = ""
    token_source: str = "none"
    masked_token: str = "（無）"
    suggestion: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def format(self) -> str:
        lines = [("✓ " if self.ok else "✗ ") + self.message]
        shown = "" if self.token_source == "none" else f"（{self.masked_token}）"
        lines.append(f"權杖來源：{SOURCE_NAMES.get(self.token_source, self.token_source)}{shown}")
        if self.hint:
            lines.append(f"解決方法：{self.hint}")
        return "\n".join(lines)

    def raise_for_status(self) -> None:
        if not self.ok:
            raise AuthError(self.message, hint=self.hint or None)


def model_page(model_id: str) -> str:
    return f"{HUB_URL}/{model_id}"


def suggest_model_id(model_id: str) -> str | None:
    """The id the user probably meant: a known wrong id's fix, else the closest known profile id."""
    if model_id in WRONG_IDS:
        return WRONG_IDS[model_id]
    known = [p.hub_id for p in PROFILES.values() if p.hub_id]
    close = difflib.get_close_matches(model_id, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _offline_mode() -> bool:
    return (
        bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)
    )


def _misspelled_vars() -> list[str]:
    return [name for name in MISSPELLED_TOKEN_VARS if os.environ.get(name) and name != "HUGGING_FACE_HUB_TOKEN"]


def _result(model_id: str, status: str, source: str, token: str | None, suggestion: str | None = None) -> AccessResult:
    page = model_page(model_id)
    shown_id = model_id
    if status == OK:
        msg, hint = f"可以存取 {shown_id}：權杖有效，且已同意模型使用條款。", ""
    elif status == NO_TOKEN:
        msg = f"找不到 Hugging Face 存取權杖，無法下載需要授權（gated）的模型 {shown_id}。"
        hint = (
            f"到 {TOKENS_PAGE} 建立一個 Read 權杖，再執行 `hf auth login` 貼上；"
            "或在 notebook 02 的密碼框輸入；或設定環境變數 HF_TOKEN。"
        )
        wrong = _misspelled_vars()
        if wrong:
            hint += f"（注意：您設定了 {'、'.join(wrong)}，但 huggingface_hub 只讀取 HF_TOKEN。）"
    elif status == INVALID_TOKEN:
        msg = "Hugging Face 拒絕了這個權杖（401）：權杖無效、已撤銷或已過期。"
        hint = f"到 {TOKENS_PAGE} 重新建立 Read 權杖，然後再登入一次。"
        if source == "HF_TOKEN":
            hint += "注意：環境變數 HF_TOKEN 的優先順序高於 hf auth login 儲存的權杖。"
    elif status == GATED:
        msg = f"權杖有效，但您尚未取得 {shown_id} 的存取權（403，需授權的模型）。"
        hint = (
            f"請用同一個帳號登入後開啟 {page}，閱讀並同意使用條款（Health AI Developer Foundations），"
            "通常幾分鐘內核准。若使用細粒度（fine-grained）權杖，還要勾選「讀取您可存取的公開 gated 儲存庫」。"
        )
    elif status == NOT_FOUND:
        msg = f"Hugging Face Hub 上沒有 {shown_id} 這個模型（404）。"
        hint = (
            f"正確的名稱應該是 {suggestion}。"
            if suggestion
            else "請確認拼字；本課程可用：google/medgemma-1.5-4b-it、google/medgemma-4b-it、"
            "google/medgemma-27b-text-it、google/medgemma-27b-it。"
        )
    elif status == FORBIDDEN:
        msg = f"權杖沒有讀取 {shown_id} 的權限（403）。"
        hint = f"細粒度權杖需勾選 gated 儲存庫的讀取權限；或到 {TOKENS_PAGE} 建立一般的 Read 權杖。"
    elif status == OFFLINE:
        msg = f"目前為離線模式（HF_HUB_OFFLINE=1），無法向 Hugging Face 確認 {shown_id} 的存取權。"
        hint = (
            "離線時請使用 demo 設定檔（Gemma 3 270M，已隨套件提供，完全不需要網路與權杖）；"
            "要下載 MedGemma 時請取消 HF_HUB_OFFLINE 再執行一次。"
        )
    elif status == NETWORK:
        msg = f"無法連線到 Hugging Face Hub，所以無法確認 {shown_id} 的存取權。"
        hint = "請檢查網路、防火牆或代理伺服器（HTTPS_PROXY）設定；沒有網路時請使用 demo 設定檔，它完全離線可用。"
    else:
        msg = f"Hugging Face Hub 回應錯誤，無法確認 {shown_id} 的存取權。"
        hint = "可能是 Hub 暫時故障或請求過多，請稍後再試；demo 設定檔不需要網路。"
    return AccessResult(model_id, status, msg, hint, source, mask_token(token), suggestion)


def check_access(
    model_id: str,
    token: str | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    offline: bool | None = None,
) -> AccessResult:
    """Ask the Hub whether this token may download ``model_id``; never raises for Hub outcomes.

    Uses ``huggingface_hub``'s HTTP session (which honours ``HF_HUB_OFFLINE`` and proxies) and its
    ``hf_raise_for_status``, so the outcomes are the library's real exception types:
    ``GatedRepoError`` → gated, ``RepositoryNotFoundError`` → not found, ``HfHubHTTPError`` 401 →
    invalid token, ``OfflineModeIsEnabled`` → offline, transport errors → network.
    ``offline=True`` answers as in offline mode without asking (used by notebook 02 in CI).
    """
    if model_id in PROFILES and PROFILES[model_id].hub_id:  # accept profile names too
        model_id = PROFILES[model_id].hub_id
    tok, source = find_token(token)
    suggestion = suggest_model_id(model_id) if model_id not in {p.hub_id for p in PROFILES.values()} else None
    if offline or (offline is None and _offline_mode()):
        return _result(model_id, OFFLINE, source, tok)
    if tok is None:
        return _result(model_id, NO_TOKEN, source, tok)
    try:
        _auth_check_request(model_id, tok, endpoint, timeout)
    except Exception as exc:  # noqa: BLE001 - mapped below, re-raised when unknown
        status = classify_hub_error(exc)
        if status is None:
            raise
        return _result(model_id, status, source, tok, suggestion if status == NOT_FOUND else None)
    return _result(model_id, OK, source, tok)


def _auth_check_request(model_id: str, token: str, endpoint: str | None, timeout: float) -> None:
    """``HfApi.auth_check`` with a timeout (the shared session has none)."""

    base = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    response = get_session().get(
        f"{base}/api/models/{model_id}/auth-check", headers=build_hf_headers(token=token), timeout=timeout
    )
    hf_raise_for_status(response)


def classify_hub_error(exc: BaseException) -> str | None:
    """Map a huggingface_hub / transport exception to an outcome code (None: not a Hub outcome)."""

    if isinstance(exc, OfflineModeIsEnabled):
        return OFFLINE
    if isinstance(exc, GatedRepoError):  # subclass of RepositoryNotFoundError: test first
        return GATED
    if isinstance(exc, RepositoryNotFoundError):
        return NOT_FOUND
    if isinstance(exc, HfHubHTTPError):
        code = exc.response.status_code if exc.response is not None else None
        if code == 401:
            return INVALID_TOKEN
        if code == 403:
            return FORBIDDEN
        return HUB_ERROR
    try:
        import httpx2

        if isinstance(exc, httpx2.TransportError):
            return NETWORK
    except ImportError:  # older huggingface_hub used requests/httpx
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return NETWORK
    return None


def outcome_table(model_id: str = "google/medgemma-4b-it"):
    """Every outcome's Chinese message and fix, as a pandas table (what a user would see online)."""

    rows = []
    for status, what in [
        (OK, "一切正常"),
        (NO_TOKEN, "沒有權杖"),
        (INVALID_TOKEN, "權杖無效（401）"),
        (GATED, "尚未同意條款（403）"),
        (NOT_FOUND, "模型名稱錯誤（404）"),
        (OFFLINE, "離線模式"),
        (NETWORK, "連不上網路"),
    ]:
        mid = "google/medgemma-4b-multimodal" if status == NOT_FOUND else model_id
        r = _result(
            mid,
            status,
            "HF_TOKEN" if status != NO_TOKEN else "none",
            None,
            suggest_model_id(mid) if status == NOT_FOUND else None,
        )
        rows.append({"情況": what, "訊息": r.message, "解決方法": r.hint or "—"})
    return pd.DataFrame(rows).set_index("情況")


def require_access(model_id: str, token: str | None = None) -> None:
    """Raise :class:`AuthError` with the Chinese message unless the token can download ``model_id``."""
    check_access(model_id, token).raise_for_status()


def whoami(token: str | None = None, *, endpoint: str | None = None) -> dict:
    """The Hub account behind the token: ``{"name", "token_source", "masked_token", "role"}``.

    Raises :class:`AuthError` (Chinese) for no token, an invalid token, offline mode or no network.
    """

    tok, source = find_token(token)
    if _offline_mode():
        r = _result("（帳號查詢）", OFFLINE, source, tok)
        raise AuthError("目前為離線模式（HF_HUB_OFFLINE=1），無法查詢 Hugging Face 帳號。", hint=r.hint)
    if tok is None:
        r = _result("MedGemma", NO_TOKEN, source, tok)
        raise AuthError("找不到 Hugging Face 存取權杖。", hint=r.hint)
    try:
        info = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT")).whoami(token=tok)
    except Exception as exc:  # noqa: BLE001
        status = classify_hub_error(exc)
        if status is None:
            raise
        r = _result("（帳號查詢）", status, source, tok)
        raise AuthError(r.message, hint=r.hint) from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    return {"name": info.get("name"), "token_source": source, "masked_token": mask_token(tok), "role": role}


# ----------------------------------------------------------------------------------------------
# Notebook helper


def use_token(token: str, *, save_login: bool = False) -> str:
    """Make ``token`` the token of this Python process (``HF_TOKEN``); optionally ``huggingface_hub.login``.

    Returns the masked form. The token is not printed; with ``save_login`` it is stored only where
    ``hf auth login`` stores it (the Hugging Face home folder), never in the notebook.
    """
    token = (token or "").strip()
    if not token:
        raise AuthError("沒有輸入權杖。", hint=f"到 {TOKENS_PAGE} 建立 Read 權杖後貼上。")
    os.environ["HF_TOKEN"] = token
    if save_login:
        login(token=token, add_to_git_credential=False, skip_if_logged_in=False)
    return mask_token(token)


def token_widget(model_id: str = "google/medgemma-4b-it", *, check: bool = True):
    """An ipywidgets password box + button. On click the token becomes this kernel's ``HF_TOKEN``,
    the box is cleared, and only the masked form and the access check's message are shown."""
    import ipywidgets as widgets

    box = widgets.Password(placeholder="hf_…", description="權杖：", layout=widgets.Layout(width="420px"))
    save = widgets.Checkbox(value=False, description="同時儲存登入（hf auth login）", indent=False)
    button = widgets.Button(description="使用這個權杖", button_style="primary")
    out = widgets.Output()

    def _on_click(_):
        value = box.value
        box.value = ""  # do not keep the secret in the widget state (saved notebooks keep widget state)
        out.clear_output()
        with out:
            try:
                masked = use_token(value, save_login=save.value)
            except AuthError as err:
                print(err.format())
                return
            print(f"已設定權杖 {masked}（只存在這個 Python 核心的記憶體中）。")
            if check:
                print(check_access(model_id).format())

    button.on_click(_on_click)
    return display.with_fallback(
        widgets.VBox([widgets.HBox([box, button]), save, out]),
        "（權杖輸入框：在 JupyterLab 執行這一格即可顯示；輸入的權杖只顯示圓點，只存在這個 Python 核心的記憶體中。）",
    )


def format_suggestions(model_ids: list[str]) -> str:
    """One line per id, ``wrong → suggested`` (:func:`suggest_model_id`; ``None`` when nothing is close)."""
    return "\n".join(f"{model_id:32} → {suggest_model_id(model_id)}" for model_id in model_ids)
