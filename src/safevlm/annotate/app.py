"""`create_app(settings)`: the rating web page of ``safevlm annotate serve``.

Pages (server-rendered HTML from ``templates/``, a little JavaScript, no build step):

* ``GET /`` — sign in by name (or with a token: ``/?token=...`` signs in at once);
* ``GET /rate`` — the rater's next unrated item; ``GET /rate/{position}`` — the item at that
  position (1-based) of the rater's own random order: image, prompt, answer, and the form
  (buttons and keyboard shortcuts), skip / back, progress ``done / total``; ``GET /done``;
* ``GET /image?item=ID`` — the item's image, read through the one image path, scaled to at
  most ``max_image_side`` pixels, sent as JPEG.

JSON API (what the page's script calls; errors are ``{"error": {"field", "message"}}``):

* ``POST /api/signin`` ``{"rater", "token"}`` — sets the session cookie (signed with the
  store's secret: a restarted server keeps raters signed in); ``POST /api/signout``;
* ``POST /api/ratings`` ``{"item", "label", "score", "risk_type", "risk_level", "comment"}`` —
  stores the rating (committed before the answer) and answers ``{"saved", "new", "done",
  "total", "next"}`` (``next``: the position of the next unrated item, ``null`` when all are);
* ``GET /api/progress``, ``GET /api/rating?item=ID`` (the rater's own rating), ``GET /health``.

The page never shows where an item came from (model, adapter, policy, task) or any automatic
verdict: item ids are opaque. Unknown raters (not on ``raters`` / in the tokens file) get a
403 page or JSON error; an item id outside the round a 404; a bad value a 422 naming the field.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import secrets
from hashlib import sha256
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from safevlm.annotate.form import REQUIRED, RatingInputError, check_rater_name, parse_rating, score_rubric
from safevlm.annotate.items import ItemSet, load_items
from safevlm.annotate.store import RatingStore, rater_order
from safevlm.errors import UsageError
from safevlm.taxonomy import DEFAULT_TAXONOMY, LEVEL_DESCRIPTIONS, Taxonomy

logger = logging.getLogger("safevlm.annotate")

TEMPLATE_DIR = Path(__file__).with_name("templates")
COOKIE = "safevlm_rater"
# keys of the risk type buttons (letters the other shortcuts do not use)
TYPE_KEYS = "abdefghijklmoqrtvwxyz"


class AnnotateSettings(BaseModel):
    """Settings of one rating round (every field is a ``safevlm annotate serve`` flag)."""

    model_config = {"extra": "forbid"}

    items: str = Field(description="Eval run folder, scan output folder or items JSONL file.")
    db: str = Field(description="The ratings store (SQLite; created if missing).")
    host: str = Field("127.0.0.1", description="Interface to bind (127.0.0.1: this machine only).")
    port: int = Field(8008, ge=0, le=65535, description="Port to bind.")
    raters: list[str] | None = Field(None, description="Only these raters may sign in (default: anyone who types a name).")
    tokens: str | None = Field(None, description="JSON file {rater: token}: each rater signs in with their token.")
    max_image_side: int = Field(1024, ge=64, description="Longest side of the images sent to the page, in pixels.")
    title: str = Field("safevlm rating", description="The page title.")

    @field_validator("raters")
    @classmethod
    def _raters(cls, value):
        if value is None:
            return None
        names = [check_rater_name(v) for v in value]
        if not names:
            raise ValueError("raters: give at least one name, or leave it out to let anyone sign in")
        return names


def read_tokens(path: "str | Path") -> dict[str, str]:
    """``{rater: token}`` from a tokens file (a JSON object, as ``safevlm annotate tokens`` writes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--tokens {str(path)!r}: no such file (make one with `safevlm annotate tokens`)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path}: expected a JSON object {{rater: token}} with at least one rater")
    for name, token in data.items():
        check_rater_name(name)
        if not isinstance(token, str) or len(token) < 8:
            raise UsageError(f"{path}: the token of {name!r} must be a string of at least 8 characters")
    if len(set(data.values())) != len(data):
        raise UsageError(f"{path}: two raters share a token")
    return {name.strip(): token for name, token in data.items()}


def make_tokens(names: list[str], path: "str | Path") -> dict[str, str]:
    """Add a random token for each new name to the tokens file ``path`` (created with mode 0600;
    existing raters keep theirs). Returns the whole ``{rater: token}`` map."""
    path = Path(path)
    tokens = read_tokens(path) if path.exists() else {}
    for name in names:
        name = check_rater_name(name)
        tokens.setdefault(name, secrets.token_urlsafe(16))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    return tokens


class Round:
    """One rating round: the items, the store, who may rate; the app's single dependency."""

    def __init__(self, settings: AnnotateSettings, items: ItemSet | None = None, taxonomy: Taxonomy = DEFAULT_TAXONOMY):
        self.settings = settings
        self.taxonomy = taxonomy
        self.items = items if items is not None else load_items(settings.items)
        self.store = RatingStore(settings.db)
        self.store.register_items(self.items.items, self.items.source)
        self.tokens = read_tokens(settings.tokens) if settings.tokens else None
        allowed = set(settings.raters) if settings.raters else None
        if self.tokens is not None:
            if allowed is not None and not allowed <= set(self.tokens):
                missing = sorted(allowed - set(self.tokens))
                raise UsageError(f"--raters {', '.join(missing)} have no token in {settings.tokens}")
            allowed = allowed or set(self.tokens)
        self.allowed = allowed
        self._secret = self.store.secret()
        self._orders: dict[str, list[str]] = {}

    # -- raters ---------------------------------------------------------------------------------------
    def check_allowed(self, rater: str) -> None:
        if self.allowed is not None and rater not in self.allowed:
            raise RatingInputError("rater", f"unknown rater {rater!r}: not a rater of this round (ask the organiser "
                                            "to add you to --raters)", 403)

    def sign_in(self, rater, token) -> str:
        """The rater's checked name (403 for an unknown rater or a wrong token)."""
        if self.tokens is not None and (rater is None or rater == "") and isinstance(token, str):
            by_token = [name for name, t in self.tokens.items() if hmac.compare_digest(t.encode(), token.encode())]
            if by_token:
                rater = by_token[0]
        rater = check_rater_name(rater)
        self.check_allowed(rater)
        if self.tokens is not None:
            if not isinstance(token, str) or not token:
                raise RatingInputError("token", f"rater {rater!r} signs in with a token", 403)
            if not hmac.compare_digest(self.tokens[rater].encode(), token.encode()):
                raise RatingInputError("token", f"wrong token for rater {rater!r}", 403)
        self.store.note_rater(rater)
        return rater

    def cookie_value(self, rater: str) -> str:
        name = base64.urlsafe_b64encode(rater.encode("utf-8")).decode("ascii")
        return f"{name}.{hmac.new(self._secret, name.encode(), sha256).hexdigest()}"

    def rater_from_cookie(self, value: str | None) -> str | None:
        """The signed-in rater (``None`` if there is no valid cookie); 403 if no longer allowed."""
        if not value or "." not in value:
            return None
        name, _, signature = value.rpartition(".")
        expected = hmac.new(self._secret, name.encode(), sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return None
        try:
            rater = base64.urlsafe_b64decode(name.encode("ascii")).decode("utf-8")
        except ValueError:
            return None
        self.check_allowed(rater)
        return rater

    # -- order and progress ---------------------------------------------------------------------------
    def order(self, rater: str) -> list[str]:
        if rater not in self._orders:
            self._orders[rater] = rater_order(rater, (item.id for item in self.items.items))
        return self._orders[rater]

    def progress(self, rater: str, after: int = 0) -> dict:
        """``{"done", "total", "next"}``: ``next`` is the 1-based position of the first unrated
        item after position ``after`` (wrapping around), ``None`` when every item is rated."""
        order = self.order(rater)
        rated = self.store.rated(rater)
        done = sum(1 for item_id in order if item_id in rated)
        nxt = None
        for offset in range(len(order)):
            index = (after + offset) % len(order)
            if order[index] not in rated:
                nxt = index + 1
                break
        return {"rater": rater, "done": done, "total": len(order), "next": nxt}


def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def create_app(settings: AnnotateSettings, items: ItemSet | None = None, taxonomy: Taxonomy = DEFAULT_TAXONOMY):
    """The FastAPI app of one rating round (``items`` given: used instead of loading ``settings.items``)."""
    round_ = Round(settings, items, taxonomy)
    env = _templates()
    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.round = round_

    def page(name: str, http_status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(name).render(title=settings.title, **context)
        return HTMLResponse(html, status_code=http_status, headers={"Cache-Control": "no-store"})

    def error_page(err: RatingInputError) -> HTMLResponse:
        return page("error.html.j2", err.status, message=str(err), status=err.status)

    def json_error(err: RatingInputError) -> JSONResponse:
        return JSONResponse(err.to_dict(), status_code=err.status)

    def session(request: Request) -> str | None:
        return round_.rater_from_cookie(request.cookies.get(COOKIE))

    def api_rater(request: Request) -> str:
        rater = session(request)
        if rater is None:
            raise RatingInputError("rater", "not signed in: POST /api/signin with your name first", 401)
        return rater

    async def json_body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RatingInputError(None, f"the request body is not JSON ({err})", 400) from None

    def set_cookie(response, rater: str):
        response.set_cookie(COOKIE, round_.cookie_value(rater), httponly=True, samesite="strict", max_age=90 * 24 * 3600)
        return response

    @app.exception_handler(RatingInputError)
    async def _input_error(request: Request, err: RatingInputError):
        if request.url.path.startswith("/api/") or request.url.path == "/image":
            return json_error(err)
        return error_page(err)

    # -- pages ------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def signin_page(request: Request, token: str | None = None):
        if token:
            rater = round_.sign_in(None, token)
            return set_cookie(RedirectResponse("/rate", status_code=303), rater)
        try:
            rater = session(request)
        except RatingInputError:
            rater = None
        if rater is not None:
            return RedirectResponse("/rate", status_code=303)
        return page("signin.html.j2", tokens=round_.tokens is not None, total=len(round_.items))

    @app.get("/rate")
    def rate_next(request: Request):
        rater = session(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        nxt = round_.progress(rater)["next"]
        return RedirectResponse(f"/rate/{nxt}" if nxt else "/done", status_code=303)

    @app.get("/rate/{position}", response_class=HTMLResponse)
    def rate_page(request: Request, position: int):
        rater = session(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        order = round_.order(rater)
        if not 1 <= position <= len(order):
            raise RatingInputError("position", f"position {position} is outside 1..{len(order)}", 404)
        item = round_.items.get(order[position - 1])
        stored = round_.store.get(item.id, rater)
        current = None
        if stored is not None:
            current = {**{k: v for k, v in stored.rating.to_dict().items() if k not in ("item", "rater")},
                       "comment": stored.comment}
        progress = round_.progress(rater)
        tax = round_.taxonomy
        types = [{"name": name, "key": TYPE_KEYS[i] if i < len(TYPE_KEYS) else None} for i, name in enumerate(tax.type_names)]
        levels = [{"id": i, "name": name, "description": LEVEL_DESCRIPTIONS[i] if i < len(LEVEL_DESCRIPTIONS) else name}
                  for i, name in enumerate(tax.level_names)]
        config = {"item": item.id, "kind": item.kind, "position": position, "total": len(order),
                  "current": current, "required": list(REQUIRED[item.kind]),
                  "types": {t["key"]: t["name"] for t in types if t["key"]}, "levels": len(levels),
                  "safe_type": tax.safe_type}
        return page("rate.html.j2", rater=rater, item=item, position=position, total=len(order),
                    done=progress["done"], rated=stored is not None, types=types, levels=levels,
                    rubric=score_rubric(), config=config)

    @app.get("/done", response_class=HTMLResponse)
    def done_page(request: Request):
        rater = session(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        progress = round_.progress(rater)
        if progress["next"] is not None:
            return RedirectResponse(f"/rate/{progress['next']}", status_code=303)
        return page("done.html.j2", rater=rater, total=progress["total"])

    @app.get("/image")
    def image(request: Request, item: str):
        from safevlm.data.images import ImageError

        api_rater(request)
        found = round_.items.get(item)
        if found is None:
            raise RatingInputError("item", f"item {item!r} is not one of the {len(round_.items)} items of this round", 404)
        if found.image is None:
            raise RatingInputError("item", f"item {item!r} has no image", 404)
        try:
            picture = found.image.open()
        except (ImageError, OSError) as err:
            logger.warning("image of item %s cannot be shown: %s", item, err)
            raise RatingInputError("item", f"the image of item {item!r} cannot be shown: {err}", 404) from None
        picture.thumbnail((settings.max_image_side, settings.max_image_side))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        return Response(buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    # -- API --------------------------------------------------------------------------------------------
    @app.post("/api/signin")
    async def api_signin(request: Request):
        body = await json_body(request)
        if not isinstance(body, dict):
            raise RatingInputError(None, "send {\"rater\": NAME} (and \"token\" when the round uses tokens)")
        rater = await run_in_threadpool(round_.sign_in, body.get("rater"), body.get("token"))
        progress = await run_in_threadpool(round_.progress, rater)
        return set_cookie(JSONResponse(progress), rater)

    @app.post("/api/signout")
    def api_signout():
        response = JSONResponse({"signed_out": True})
        response.delete_cookie(COOKIE)
        return response

    @app.post("/api/ratings")
    async def api_rate(request: Request):
        rater = api_rater(request)
        body = await json_body(request)

        def save() -> dict:
            rating, comment, item = parse_rating(body, round_.items, rater, round_.taxonomy)
            new = round_.store.save(rating, comment)
            position = round_.order(rater).index(item.id) + 1
            return {"saved": item.id, "new": new, **round_.progress(rater, after=position)}

        return JSONResponse(await run_in_threadpool(save))

    @app.get("/api/progress")
    def api_progress(request: Request):
        return round_.progress(api_rater(request))

    @app.get("/api/rating")
    def api_rating(request: Request, item: str):
        rater = api_rater(request)
        if item not in round_.items:
            raise RatingInputError("item", f"item {item!r} is not one of the {len(round_.items)} items of this round", 404)
        stored = round_.store.get(item, rater)
        if stored is None:
            raise RatingInputError("item", f"{rater!r} has not rated item {item!r}", 404)
        return stored.to_dict()

    @app.get("/health")
    def health():
        return {"status": "ok", "items": len(round_.items)}

    return app


def run_server(settings: AnnotateSettings) -> None:
    """Serve a rating round until interrupted (uvicorn)."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.raters or settings.tokens):
        logger.warning("serving on %s without --raters or --tokens: anyone who can reach it can rate", settings.host)
    app = create_app(settings)
    print(f"rating {len(app.state.round.items)} item(s) into {settings.db}: http://{settings.host}:{settings.port}/",
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


__all__ = ["AnnotateSettings", "COOKIE", "Round", "create_app", "make_tokens", "read_tokens", "run_server"]
