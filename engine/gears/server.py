"""The annotation tool for people (gears 1 and 2): one web page served from the store.

The page shows a store image; a left click adds a positive point, a right click a negative one,
and the mask SAM predicts from all points so far (the previous low-res logits fed back, as the
simulated annotator does) is drawn over the image. Enter / `a` accepts the mask, `z` /
Backspace undoes the last point, `s` skips the mask, `n` goes to the next image. Each mask has a
time limit (`annotate.time_limit_s`, 30 s as in the SAM paper), shown as a countdown; when it
runs out the mask is skipped and the annotator moves on.

Clicks are answered by the decoder alone: the image's embedding is read from the store
(`sa-engine run assisted --annotator none` stores them) or, for an image without one, computed once
when the image is opened. Every accept and every finished image commits the shard's output
atomically (`Store.write_shard_output`) to `stages/<stage>/round-<k>/`, masks with their effort
(clicks, real seconds from the first click to the accept, annotator "person"); the completion
record's meta says how many of the shard's images are done, and a restarted server resumes there.
A session that commits anything keeps a run record under `runs/<stage>/`, as the Ray gears do:
the model and its weights, the settings, and the shards it committed (a release's `made_by`
names it for them). Several people annotate one store with one server each: a session holds
each shard it opens an image of (`Store.lease_shard`, until it stops), reads that shard's
committed work afresh when it takes it, and passes over the shards other sessions hold, so no
session's commit drops another's masks.

The server is stdlib `http.server` (one page, a JSON API); one lock serialises the predictor.
Served beyond this machine (`--host`), it asks every request for a token (`make_server`): the
address `serve` prints carries it once, and the page's cookie after that.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable

import numpy as np

from engine.gears import ASSISTED_STAGE
from engine.gears.assisted import mask_record
from engine.gears.embeddings import set_image
from engine.gears.semi import prefilled_effort
from engine.image_io import ImageLoadError, load_image
from engine.predictor import SamPredictor
from engine.records import MaskRecord
from sharding.locks import HeldLock, describe_this_process
from sharding.runner import annotation_id, unreadable_entry
from sharding.store import ShardOutput, Store, utc_now
from sharding.tables import table_to_masks

def mask_png(mask: np.ndarray) -> bytes:
    """An HxW bool mask as a 1-bit greyscale PNG (white on the mask, black elsewhere; the page
    tints it). One bit per pixel instead of RGBA: a 1500x1000 mask encodes in ~1.5 ms instead of
    ~7.5 ms for 8-bit grey, on every click."""
    import cv2

    ok, buf = cv2.imencode(
        ".png",
        mask.astype(np.uint8) * 255,
        [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1],
    )
    if not ok:
        raise ValueError("could not encode the mask as PNG")
    return buf.tobytes()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Accepted:
    record: MaskRecord
    effort: dict[str, Any]


@dataclass
class ShardWork:
    """A shard's work by people so far: accepted masks per image and the finished images."""

    images: list[int]
    masks: dict[int, list[Accepted]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    quarantined: dict[int, dict[str, Any]] = field(default_factory=dict)  # unreadable, with reasons
    skipped: int = 0
    timed_out: int = 0


@dataclass
class Current:
    """The mask being drawn: its clicks, the logits after each, when the first click came."""

    image_id: int
    rgb: np.ndarray
    clicks: list[tuple[float, float, int]] = field(default_factory=list)
    results: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    started: float | None = None
    from_store: bool = False


class AnnotationSession:
    """The tool's state over a store: which image, the current mask, the accepted ones.

    Arguments:
      store (Store): the store; images in manifest order.
      predictor (SamPredictor): the model of this round (decoder-only per click).
      round_ (int): the model round; output goes to stages/<stage>/round-<round_>/.
      time_limit_s (float): per-mask time limit shown on the page.
      stage (str): "assisted" (gear 1) or "semi" (gear 2).
      prefill: gear 2: called with the predictor set to a new image, returns its prefilled masks
        ((HxW bool, 1x256x256 logits, predicted IoU), e.g. `engine.gears.semi.prefill`); they are
        shown as accepted and saved as prefilled, and the person adds only what is missing.
      meta (dict): what the session's run record keeps as its settings
        (`engine.gears.gear_facts`; the CLI's `serve` fills it).
    """

    def __init__(
        self,
        store: Store,
        predictor: SamPredictor,
        round_: int = 0,
        time_limit_s: float = 30.0,
        stage: str = ASSISTED_STAGE,
        prefill: Callable[[SamPredictor], list[tuple[np.ndarray, np.ndarray, float]]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if time_limit_s <= 0:
            raise ValueError(f"time limit {time_limit_s} s must be > 0")
        self.store, self.predictor, self.round, self.stage = store, predictor, round_, stage
        self.time_limit_s = float(time_limit_s)
        self.lock = threading.Lock()
        shard_images = store.shard_images()
        self.order: list[tuple[str, int]] = [
            (shard, i) for shard, ids in shard_images.items() for i in ids
        ]
        self.shard_of = {i: s for s, i in self.order}
        # what is done per shard; a shard's masks are read when the session takes it (`_take`)
        self.work = {
            shard: self._load_work(shard, ids, masks=False) for shard, ids in shard_images.items()
        }
        self.current: Current | None = None
        self.prefill = prefill
        self.leases: dict[str, HeldLock] = {}
        self.holder = describe_this_process()  # what its shards' lease files say of it
        started = utc_now()
        self.run: dict[str, Any] = {
            "started_at": started,
            "state": "serving",
            "stage": stage,
            "round": round_,
            "annotator": "person",
            "processed": [],  # shards this session committed, in first-commit order
            "images": 0,  # images this session finished (accepted, done, or quarantined)
            "accepted": 0,  # masks the person accepted
            "meta": meta or {},
        }
        self.run_path = store.run_record_path(stage, started, round_)

    # ---- state ---------------------------------------------------------------------------
    def _load_work(self, shard: str, ids: list[int], masks: bool = True) -> ShardWork:
        """A shard's committed work by people; without its masks (`masks=False`): the images done
        only, from the completion record (a store of thousands of shards opens at once)."""
        work = ShardWork(ids)
        record = self.store.done_record(self.stage, self.round, shard)
        if record is None:
            return work
        work.done = set(record["images"])
        work.quarantined = {q["image_id"]: q for q in record.get("quarantined", [])}
        meta = record.get("meta", {})
        work.skipped, work.timed_out = meta.get("skipped", 0), meta.get("timed_out", 0)
        if not masks:
            return work
        table = self.store.read_annotations(self.stage, self.round, shard)
        efforts = {
            row["id"]: {k: row[k] for k in ("clicks", "iou", "seconds", "prefilled", "annotator")}
            for row in table.select(
                ["id", "clicks", "iou", "seconds", "prefilled", "annotator"]
            ).to_pylist()
        }
        for image_id, records in table_to_masks(table).items():
            work.masks[image_id] = [Accepted(m, efforts.get(m.id, {})) for m in records]
        return work

    def _commit(self, shard: str) -> None:
        work = self.work[shard]
        out = ShardOutput(
            done=sorted(work.done), quarantined=[work.quarantined[i] for i in sorted(work.quarantined)]
        )
        for image_id in sorted(work.masks):
            for k, acc in enumerate(work.masks[image_id]):
                mask_id = annotation_id(image_id, k)
                acc.record.id = mask_id
                out.masks.append((image_id, acc.record))
                out.effort[mask_id] = acc.effort
        out.meta = {
            "annotator": "person",
            "images_total": len(work.images),
            "images_done": len(work.done),
            "complete": len(work.done) == len(work.images),
            "skipped": work.skipped,
            "timed_out": work.timed_out,
            "time_limit_s": self.time_limit_s,
        }
        self.store.write_shard_output(self.stage, self.round, shard, out)
        if shard not in self.run["processed"]:
            self.run["processed"].append(shard)
        self.store.write_run_record(self.stage, self.run, self.run_path)

    def _finish(self, shard: str, image_id: int) -> None:
        if image_id not in self.work[shard].done:
            self.work[shard].done.add(image_id)
            self.run["images"] += 1

    def _take(self, shard: str) -> bool:
        """Hold `shard` for this session (True), or False: another session holds it. Its work is
        read again on taking it: another session may have committed to it since this one began."""
        if shard in self.leases:
            return True
        lease = self.store.lease_shard(self.stage, self.round, shard, self.holder)
        if lease is None:
            return False
        # The lease first, then the batch lock (a batch run takes its lock, then reads the
        # leases): whichever comes second sees the other.
        batch = self.store.batch_holder(self.stage, self.round)
        if batch is not None:
            lease.release()
            raise ValueError(
                f"a batch run of {self.stage} round {self.round} is writing this round ({batch}): "
                "wait for it to end, or annotate another round (--round)"
            )
        self.leases[shard] = lease
        self.work[shard] = self._load_work(shard, self.work[shard].images)
        return True

    def _give_back_if_finished(self, shard: str) -> None:
        """Let go of a shard this session took only to find it finished by others: holding it
        would keep other people from adding to it until this session stops."""
        work = self.work[shard]
        untouched = shard not in self.run["processed"]
        current = self.current is not None and self.shard_of[self.current.image_id] == shard
        if untouched and not current and len(work.done) == len(work.images):
            self.leases.pop(shard).release()

    def close(self) -> None:
        """The server stops: mark the run record (if the session committed anything) stopped,
        and give its shards back."""
        with self.lock:
            if self.run["processed"]:
                self.run.update(state="stopped", finished_at=utc_now())
                self.store.write_run_record(self.stage, self.run, self.run_path)
            for lease in self.leases.values():
                lease.release()
            self.leases.clear()

    def _image(self, image_id: int) -> Current:
        if self.current is not None and self.current.image_id == image_id:
            return self.current
        shard = self._shard(image_id)
        if not self._take(shard):
            holder = self.store.lease_holder(self.stage, self.round, shard) or "it has just stopped"
            raise ValueError(
                f"image {image_id} is in {shard}, which another annotation session holds ({holder}): "
                "open another image (n), or stop that session"
            )
        row = self.store.read_image(shard, image_id)
        rgb = load_image(
            row.data, name=row.source, max_pixels=self.store.max_pixels, min_side=self.store.min_side
        )
        from_store = set_image(self.predictor, self.store, shard, image_id, rgb)
        self.current = Current(image_id, rgb, from_store=from_store)
        work = self.work[shard]
        if self.prefill is not None and image_id not in work.done and image_id not in work.masks:
            work.masks[image_id] = [
                Accepted(mask_record(m, logits, score, [], self.predictor), prefilled_effort())
                for m, logits, score in self.prefill(self.predictor)
            ]
        return self.current

    def _shard(self, image_id: int) -> str:
        if image_id not in self.shard_of:
            raise ValueError(f"image {image_id} is not in {self.store.root}")
        return self.shard_of[image_id]

    # ---- API -----------------------------------------------------------------------------
    def next_image(self, after: int | None = None) -> dict[str, Any]:
        """The first unfinished image after `after` (or from the start); {"image_id": None} when
        every image is done."""
        ids = [i for _, i in self.order]
        start = ids.index(after) + 1 if after in ids else 0
        elsewhere: set[str] = set()  # shards other sessions hold
        for image_id in ids[start:] + ids[:start]:
            shard = self.shard_of[image_id]
            if shard in elsewhere or image_id in self.work[shard].done:
                continue
            if not self._take(shard):
                elsewhere.add(shard)
                continue
            if image_id in self.work[shard].done:  # finished by another session since
                self._give_back_if_finished(shard)
                continue
            try:
                cur = self._image(image_id)
            except ImageLoadError as err:  # unreadable: done without masks, quarantined with why
                row = self.store.read_image(shard, image_id)
                self.work[shard].quarantined[image_id] = unreadable_entry(row, err)
                self._finish(shard, image_id)
                self._commit(shard)
                continue
            return self.describe(cur)
        done = sum(len(work.done) for work in self.work.values())
        # images left in shards other sessions hold (as far as this session has seen them)
        return {"image_id": None, "done": done, "total": len(ids), "elsewhere": len(ids) - done}

    def describe(self, cur: Current) -> dict[str, Any]:
        shard = self.shard_of[cur.image_id]
        accepted = self.work[shard].masks.get(cur.image_id, [])
        prefilled = sum(1 for a in accepted if a.effort.get("prefilled"))
        h, w = cur.rgb.shape[:2]
        done = sum(len(wk.done) for wk in self.work.values())
        return {
            "image_id": cur.image_id,
            "shard": shard,
            "width": w,
            "height": h,
            "accepted": len(accepted),
            "prefilled": prefilled,
            "accepted_png": self._accepted_png(cur.image_id, (h, w)),
            "embedding": "stored" if cur.from_store else "computed",
            "done": done,
            "total": len(self.order),
            "time_limit_s": self.time_limit_s,
        }

    def _accepted_png(self, image_id: int, size: tuple[int, int]) -> str | None:
        from engine import rle

        accepted = self.work[self.shard_of[image_id]].masks.get(image_id, [])
        if not accepted:
            return None
        union = np.zeros(size, bool)
        for acc in accepted:
            union |= rle.decode(acc.record.segmentation)
        return data_url(mask_png(union))

    def image_jpeg(self, image_id: int) -> bytes:
        import cv2

        cur = self._image(image_id)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(cur.rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
        )
        return buf.tobytes()

    def click(self, image_id: int, x: float, y: float, positive: bool) -> dict[str, Any]:
        cur = self._image(image_id)
        h, w = cur.rgb.shape[:2]
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"click ({x:g}, {y:g}) is outside the {w}x{h} image")
        if cur.started is None:
            cur.started = time.monotonic()
        t0 = time.perf_counter()
        cur.clicks.append((float(x), float(y), int(positive)))
        logits = cur.results[-1][1] if cur.results else None
        masks, scores, low_res = self.predictor.predict(
            np.array([[c[0], c[1]] for c in cur.clicks]),
            np.array([c[2] for c in cur.clicks]),
            mask_input=logits,
            multimask_output=len(cur.clicks) == 1,
        )
        best = int(np.argmax(scores))  # a person sees one mask; the model's best guess
        cur.results.append((masks[best], low_res[best][None], float(scores[best])))
        decoder_ms = (time.perf_counter() - t0) * 1000
        return self._mask_reply(cur, decoder_ms)

    def _mask_reply(self, cur: Current, decoder_ms: float = 0.0) -> dict[str, Any]:
        if not cur.results:
            return {"mask_png": None, "area": 0, "clicks": 0, "score": None}
        mask, _, score = cur.results[-1]
        return {
            "mask_png": data_url(mask_png(mask)),
            "area": int(np.count_nonzero(mask)),
            "clicks": len(cur.clicks),
            "points": cur.clicks,
            "score": score,
            "decoder_ms": round(decoder_ms, 1),
        }

    def undo(self, image_id: int) -> dict[str, Any]:
        cur = self._image(image_id)
        if cur.clicks:
            cur.clicks.pop()
            cur.results.pop()
        if not cur.clicks:
            cur.started = None
        return self._mask_reply(cur)

    def skip(self, image_id: int, timed_out: bool = False) -> dict[str, Any]:
        cur = self._image(image_id)
        shard = self.shard_of[image_id]
        if cur.clicks:
            if timed_out:
                self.work[shard].timed_out += 1
            else:
                self.work[shard].skipped += 1
        cur.clicks, cur.results, cur.started = [], [], None
        return self._mask_reply(cur)

    def accept(self, image_id: int) -> dict[str, Any]:
        cur = self._image(image_id)
        if not cur.results:
            raise ValueError("there is no mask to accept: click on the object first")
        mask, logits, score = cur.results[-1]
        if not mask.any():
            raise ValueError("the mask is empty: add a positive point on the object")
        foreground = [[x, y] for x, y, positive in cur.clicks if positive]
        record = mask_record(mask, logits, score, foreground, self.predictor)
        seconds = time.monotonic() - (cur.started or time.monotonic())
        effort = {
            "clicks": len(cur.clicks),
            "iou": None,
            "seconds": round(seconds, 3),
            "prefilled": False,
            "annotator": "person",
        }
        shard = self.shard_of[image_id]
        work = self.work[shard]
        work.masks.setdefault(image_id, []).append(Accepted(record, effort))
        self._finish(shard, image_id)  # an image with an accepted mask is in the output from now on
        self.run["accepted"] += 1
        self._commit(shard)
        cur.clicks, cur.results, cur.started = [], [], None
        reply = self.describe(cur)
        reply["saved_id"] = record.id
        return reply

    def finish_image(self, image_id: int) -> dict[str, Any]:
        """The annotator is done with this image (even with no mask): commit it, go on."""
        cur = self._image(image_id)
        self.skip(image_id)
        shard = self.shard_of[image_id]
        self._finish(shard, image_id)
        self._commit(shard)
        return self.next_image(after=cur.image_id)


def page() -> bytes:
    return resources.files("engine.gears").joinpath("web/annotate.html").read_bytes()


TOKEN_COOKIE = "sa_engine_token"


class Handler(BaseHTTPRequestHandler):
    session: AnnotationSession  # set on the subclass made by `make_server`
    token: str | None = None  # every request must carry it (?token= or the cookie), if set

    def _token_ok(self, query: str) -> bool:
        if self.token is None:
            return True
        given = _params(query).get("token")
        if given is None:
            try:
                cookie = SimpleCookie(self.headers.get("Cookie") or "").get(TOKEN_COOKIE)
            except CookieError:
                cookie = None
            given = cookie.value if cookie is not None else None
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    def _refuse(self) -> None:
        message = "this server asks for its token: open the address `sa-engine serve` printed (/?token=...)"
        self._json({"error": message}, HTTPStatus.FORBIDDEN)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints the URL
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if not self._token_ok(query):
            return self._refuse()
        try:
            if path in ("/", "/index.html"):
                cookie = None
                if self.token is not None:  # the page's own requests carry it from here on
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                return self._send(page(), "text/html; charset=utf-8", cookie=cookie)
            if path == "/api/next":
                after = _params(query).get("after")
                with self.session.lock:
                    reply = self.session.next_image(int(after) if after else None)
                return self._json(reply)
            if path.startswith("/api/image/"):
                image_id = int(path.removeprefix("/api/image/").removesuffix(".jpg"))
                with self.session.lock:
                    data = self.session.image_jpeg(image_id)
                return self._send(data, "image/jpeg")
        except ValueError as exc:
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        self._json({"error": f"no such page {path}"}, HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        actions = {
            "/api/click": lambda s, b: s.click(
                int(b["image_id"]), float(b["x"]), float(b["y"]), bool(b["positive"])
            ),
            "/api/undo": lambda s, b: s.undo(int(b["image_id"])),
            "/api/skip": lambda s, b: s.skip(int(b["image_id"]), bool(b.get("timed_out"))),
            "/api/accept": lambda s, b: s.accept(int(b["image_id"])),
            "/api/finish": lambda s, b: s.finish_image(int(b["image_id"])),
        }
        path, _, query = self.path.partition("?")
        if not self._token_ok(query):
            return self._refuse()
        action = actions.get(path)
        if action is None:
            return self._json({"error": f"no such action {path}"}, HTTPStatus.NOT_FOUND)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise TypeError
        except (ValueError, TypeError):
            message = f"{self.path}: the request body must be a JSON object, e.g. {{\"image_id\": 1}}"
            return self._json({"error": message}, HTTPStatus.BAD_REQUEST)
        try:
            with self.session.lock:
                reply = action(self.session, body)
        except KeyError as exc:
            message = f"{self.path}: the request body has no {exc.args[0]!r}"
            return self._json({"error": message}, HTTPStatus.BAD_REQUEST)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        self._json(reply)

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _send(
        self, data: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK, cookie: str | None = None
    ) -> None:
        self.send_response(status)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def _params(query: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in query.split("&") if "=" in p)


def make_server(
    session: AnnotationSession, host: str = "127.0.0.1", port: int = 0, token: str | None = None
):
    """A ThreadingHTTPServer for `session` (port 0: a free port; see `server.server_address`).
    With `token`, a request without it (`?token=`, or the cookie the page gets) is refused: the
    tool writes to the store, and anyone who can reach a server bound beyond this machine could
    otherwise commit masks in the annotator's name."""
    handler = type("SessionHandler", (Handler,), {"session": session, "token": token})
    return ThreadingHTTPServer((host, port), handler)
